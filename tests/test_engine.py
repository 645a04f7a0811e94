"""End to end: a generated sharded Llama zoo merged through the CLI, checked against an
independent whole-tensor reference merge, loaded with transformers; determinism; manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_folder
from reference_merge import RAM_EPSILON, reference_merge
from reference_merge import nuslerp as reference_nuslerp
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeflow.cli import app
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError
from mergeflow.methods import METHODS
from mergeflow.output import ShardedWriter
from mergeflow.safetensors_io import FLOAT32, PlannedTensor, TensorFileReader, read_header
from mergeflow.storage import locate
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

# --- helpers ----------------------------------------------------------------------------------


def config_for(method: str, zoo: dict[str, str], n: int = 4) -> dict:
    experts = [zoo[f"expert_{i}"] for i in range(min(n, METHODS[method].max_models or n))]
    models = [{"model": e} for e in experts]
    parameters: dict = {}
    if METHODS[method].param("density") is not None:
        parameters["density"] = 0.5
    if method == "sce":
        parameters["select_topk"] = 0.5
    if method == "slerp":
        parameters = {"t": 0.5}
    if method == "nearswap":  # about the size of the zoo's task vectors: partial swaps
        parameters = {"t": 0.005}
    if method in ("ram", "ramplus_tl"):  # about the size of the zoo's task vectors: some
        parameters = {"epsilon": RAM_EPSILON}  # entries changed by one model, some by several
    if method == "nuslerp":  # one angle per vector along dim 0: sums across chunks
        parameters = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    if method not in ("average", "passthrough"):  # these take every model listed as a model
        # mergekit configs often repeat the base under models; it must not count as an expert
        models = [{"model": zoo["base"]}, *models]
    return {
        "merge_method": method,
        "base_model": zoo["base"],
        "models": models,
        "parameters": parameters,
        "dtype": "float32",
    }


def cli_merge(tmp_path: Path, config: dict, out: Path, *extra: str):
    path = tmp_path / f"{config['merge_method']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(
        app, ["merge", str(path), "--out", str(out), "-q", "--shard-size", "100KB", *extra]
    )


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_merge_of_a_sharded_zoo_matches_the_reference(method, zoo, tmp_path):
    out = tmp_path / "merged"
    result = cli_merge(tmp_path, config_for(method, zoo), out)
    assert result.exit_code == 0, result.output
    merged = load_folder(out)
    n = min(4, METHODS[method].max_models or 4)
    expected = reference_merge(
        method, load_folder(zoo["base"]), [load_folder(zoo[f"expert_{i}"]) for i in range(n)]
    )
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")


def test_merged_model_loads_in_transformers_and_runs(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ties"
    assert cli_merge(tmp_path, config_for("ties", zoo), out).exit_code == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name, tensor in load_folder(out).items():
        assert torch.equal(state[name], tensor)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all()


def test_manifest_records_every_file_inputs_and_parameters(zoo, tmp_path):
    out = tmp_path / "m"
    result = merge(parse_config(config_for("dare_ties", zoo)), str(out), max_shard_bytes=100_000)
    manifest = json.loads((out / "mergeflow-manifest.json").read_text())
    assert manifest == result.manifest
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {p.name for p in out.iterdir()} - {"mergeflow-manifest.json"}
    for f in manifest["files"]:
        data = (out / f["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
    assert manifest["method"] == "dare_ties"
    assert [m["ref"] for m in manifest["inputs"]["models"]] == [zoo[f"expert_{i}"] for i in range(4)]
    assert len({m["sha256"] for m in manifest["inputs"]["models"]}) == 4
    assert manifest["config"]["parameters"] == {"density": 0.5}


def test_output_dtype_and_config_follow_the_yaml(zoo, tmp_path):
    config = config_for("average", zoo) | {"dtype": "float32", "out_dtype": "bfloat16"}
    merge(parse_config(config), str(tmp_path / "bf16"))
    merged = load_folder(tmp_path / "bf16")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"


@pytest.fixture(scope="module")
def wide_zoo(tmp_path_factory):
    """Tensors spanning several DARE blocks and chunks (embed 4096 x 64 = 4 blocks)."""
    spec = GeneratedZooSpec(vocab_size=4096, hidden_size=64, intermediate_size=1536, num_experts=4, seed=5)
    return build_generated_zoo(tmp_path_factory.mktemp("wide"), spec)


# slerp returns a view of the engine's reused chunk buffer, which the next chunk overwrites
# while the background writer may still be writing the last one.
@pytest.mark.parametrize(
    "method",
    [
        "dare_ties",
        "ties",
        "model_stock",
        "breadcrumbs_ties",
        "slerp",
        "della",
        "sce",
        "nuslerp",
        "multislerp",
        "karcher",
        "ramplus_tl",
        "arcee_fusion",
    ],
)
def test_bit_identical_across_threads_and_chunk_sizes(method, wide_zoo, tmp_path):
    config = parse_config(config_for(method, wide_zoo))
    runs = []
    # The smallest chunks (1024 elements) hold less than one of the 1536-element rows of
    # down_proj, which DELLA ranks whole; 2 MB gives 65536, not a multiple of 1536.
    for threads, work_bytes in ((1, 2 << 20), (2, 8 << 20), (2, 1 << 30), (2, 1)):
        out = tmp_path / f"{threads}-{work_bytes}"
        merge(config, str(out), threads=threads, work_bytes=work_bytes)
        runs.append(load_folder(out))
    torch.set_num_threads(2)
    for other in runs[1:]:
        for name, tensor in runs[0].items():
            assert torch.equal(tensor, other[name]), f"{method}: {name} differs"


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
def test_nuslerp_through_small_chunks_matches_the_reference(flatten, row_wise, wide_zoo, tmp_path):
    config = config_for("nuslerp", wide_zoo)
    config["parameters"] = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    merge(parse_config(config), str(tmp_path / "out"), work_bytes=1 << 16)
    merged = load_folder(tmp_path / "out")
    base, experts = load_folder(wide_zoo["base"]), [load_folder(wide_zoo[f"expert_{i}"]) for i in range(2)]
    for name, tensor in merged.items():
        models = torch.stack([e[name].float() for e in experts])
        expected = reference_nuslerp(base[name].float(), models, torch.ones(2), row_wise, flatten)
        torch.testing.assert_close(tensor, expected.float(), rtol=1e-5, atol=1e-6, msg=name)


def test_a_merge_keeps_the_thread_count_of_torch(wide_zoo, tmp_path):
    # A one-thread Dask worker limits torch. numba's thread pool, started by the first merge of
    # a process, used to raise the OpenMP thread count that torch's element-wise operations
    # then used; and the kernels ran two threads. Both doubled the threads per worker.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_for("ties", wide_zoo)))
    script = f"""
import numba, torch
torch.set_num_threads(1)
assert torch.get_num_threads() == 1
from mergeflow.config import load_config
from mergeflow.engine import merge
merge(load_config({str(config)!r}), {str(tmp_path / "out")!r})
print(torch.get_num_threads(), numba.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.parametrize(
    "method",
    [
        "ties", "breadcrumbs_ties", "dare_ties", "della", "sce", "task_arithmetic", "average", "nuslerp",
        "multislerp", "karcher", "ramplus_tl", "arcee_fusion",
    ],
)  # fmt: skip
def test_bfloat16_inputs_merge_exactly_as_their_float32_values(method, tmp_path):
    # bfloat16 tensors reach the kernels as raw bit patterns; float32 copies of the same values
    # take the plain path. Both must give bit-identical merges, in several chunks per tensor.
    spec = GeneratedZooSpec(vocab_size=4096, hidden_size=64, intermediate_size=1536, num_experts=2, seed=3)
    bf16 = build_generated_zoo(tmp_path / "bf16", replace(spec, dtype="bfloat16"))
    f32 = {}
    for name, folder in bf16.items():
        f32[name] = str(tmp_path / "f32" / name)
        shutil.copytree(folder, f32[name])
        for file in Path(f32[name]).glob("*.safetensors"):
            save_file({k: v.float() for k, v in load_file(file).items()}, file)
    merged = []
    for zoo in (bf16, f32):
        out = tmp_path / f"merged-{len(merged)}"
        config = parse_config(config_for(method, zoo, n=2) | {"out_dtype": "float32"})
        merge(config, str(out), work_bytes=1 << 20)
        merged.append(load_folder(out))
    assert merged[0].keys() == merged[1].keys()
    for name, tensor in merged[0].items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, merged[1][name]), name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della_linear", "sce", "ram", "average", "slerp"])
def test_a_bfloat16_output_holds_the_float32_merge_rounded_as_torch_rounds(method, wide_zoo, tmp_path):
    # Task-vector methods and average round inside their kernel; slerp's float32 result is
    # narrowed after. Either way each value is the float32 merge's, rounded by torch's rules.
    merged = {}
    for out_dtype in ("float32", "bfloat16"):
        config = parse_config(config_for(method, wide_zoo, n=2) | {"out_dtype": out_dtype})
        merge(config, str(tmp_path / out_dtype), work_bytes=1 << 20)
        merged[out_dtype] = load_folder(tmp_path / out_dtype)
    for name, tensor in merged["bfloat16"].items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, merged["float32"][name].bfloat16()), (
            name
        )


def test_dare_seed_changes_the_result(zoo, tmp_path):
    config = config_for("dare_ties", zoo)
    merge(parse_config(config), str(tmp_path / "s0"))
    config["parameters"]["seed"] = 1
    merge(parse_config(config), str(tmp_path / "s1"))
    a, b = load_folder(tmp_path / "s0"), load_folder(tmp_path / "s1")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_gradient_and_filter_parameters_apply_per_layer(zoo, tmp_path):
    config = config_for("task_arithmetic", zoo, n=1)
    config["parameters"] = {"lambda": [{"filter": "mlp", "value": 0.0}, {"value": [1.0, 3.0]}]}
    merge(parse_config(config), str(tmp_path / "g"))
    merged, base, expert = (load_folder(p) for p in (tmp_path / "g", zoo["base"], zoo["expert_0"]))
    mlp = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[mlp], base[mlp])  # the filter sets λ = 0 on mlp tensors
    for layer, lam in ((0, 1.0), (1, 3.0)):  # the gradient runs 1 -> 3 over the 2 layers
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(merged[name], base[name] + lam * (expert[name] - base[name]))


def test_allow_crimes_merges_models_that_name_other_architectures_as_the_bases(zoo, tmp_path):
    # mergekit's --allow-crimes: a Mistral-named copy of a Llama expert has the same tensors
    mistral = tmp_path / "mistral-named"
    shutil.copytree(zoo["expert_1"], mistral)
    settings = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(settings | {"architectures": ["MistralForCausalLM"]}))
    config = config_for("ties", zoo, n=1)
    plain = config | {"models": [*config["models"], {"model": zoo["expert_1"]}]}
    crime = config | {"models": [*config["models"], {"model": str(mistral)}]}
    assert cli_merge(tmp_path, plain, tmp_path / "plain").exit_code == 0
    refused = cli_merge(tmp_path, crime, tmp_path / "refused")
    assert refused.exit_code == 2 and "--allow-crimes" in refused.output
    assert cli_merge(tmp_path, crime, tmp_path / "crime", "--allow-crimes").exit_code == 0
    merged, expected = load_folder(tmp_path / "crime"), load_folder(tmp_path / "plain")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], tensor) for name, tensor in expected.items())
    assert json.loads((tmp_path / "crime" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]


def test_existing_output_is_kept_unless_overwrite(zoo, tmp_path):
    out = tmp_path / "out"
    assert cli_merge(tmp_path, config_for("average", zoo), out).exit_code == 0
    before = (out / "mergeflow-manifest.json").read_text()
    again = cli_merge(tmp_path, config_for("task_arithmetic", zoo), out)
    assert again.exit_code == 2 and "already exists" in again.output
    assert (out / "mergeflow-manifest.json").read_text() == before
    assert cli_merge(tmp_path, config_for("task_arithmetic", zoo), out, "--overwrite").exit_code == 0
    assert json.loads((out / "mergeflow-manifest.json").read_text())["method"] == "task_arithmetic"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_console_script_runs(zoo, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_for("ties", zoo)))
    done = subprocess.run(
        [sys.executable, "-m", "mergeflow.cli", "merge", str(path), "--out", str(tmp_path / "o"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "merged 21 tensors" in done.stdout and "with ties" in done.stdout
    # The quick exit keeps a failure's exit status and its one-line message.
    missing = tmp_path / "missing.yaml"
    failed = subprocess.run(
        [sys.executable, "-m", "mergeflow.cli", "merge", str(missing), "--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2 and f"error: {missing}: cannot read config" in failed.stderr


def test_a_merge_process_does_not_load_torch(zoo, tmp_path):
    # Importing torch took ~0.8 s and ~250 MB of a small merge; the engine is numpy and numba.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_for("dare_ties", zoo)))
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules))\n"
        "from mergeflow.cli import run\n"
        "run()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "merge", str(path), "--out", str(tmp_path / "o"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "with dare_ties" in done.stdout and "torch loaded: False" in done.stdout


def test_an_error_of_a_background_write_is_raised_in_order(tmp_path):
    plan = [PlannedTensor("a", FLOAT32, (4,)), PlannedTensor("b", FLOAT32, (4,))]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=1 << 20, background=True)
    writer.write("a", np.ones(4, np.float32))
    writer.write("b", np.ones(8, np.float32))  # larger than planned: fails on the writer thread
    with pytest.raises(RuntimeError, match="tensor 'b' overflows its planned size"):
        writer.finish()
    writer.abort()

    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=1 << 20, background=True)
    for name in ("a", "b"):
        writer.write(name, np.arange(4, dtype=np.float32))
    (file,) = writer.finish()
    written = tmp_path / file.path
    assert file.sha256 == hashlib.sha256(written.read_bytes()).hexdigest()
    loaded = load_file(written)
    assert sorted(loaded) == ["a", "b"]
    assert all(torch.equal(t, torch.arange(4, dtype=torch.float32)) for t in loaded.values())


def test_a_mapped_tensor_holds_the_bytes_a_read_returns(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7)}
    save_file(tensors, tmp_path / "model.safetensors")
    entries = {e.name: e for e in read_header(locate(str(tmp_path / "model.safetensors")))}
    reader = TensorFileReader()
    for name, entry in entries.items():
        mapped = reader.map(entry)
        assert not mapped.flags.writeable
        read = reader.read(entry, 0, entry.numel)
        assert mapped.tobytes() == read.tobytes(), name

    with open(tmp_path / "model.safetensors", "r+b") as file:  # cut short after its header was read
        file.truncate(file.seek(0, 2) - 4)
    last = max(entries.values(), key=lambda e: e.offset)
    with pytest.raises(CheckpointError, match=f"tensor '{last.name}': cannot map it"):
        reader.map(last)
    with pytest.raises(
        CheckpointError, match=f"tensor '{last.name}': read \\d+ of \\d+ bytes; the file changed"
    ):
        reader.read(last, 0, last.numel)
    reader.close()
