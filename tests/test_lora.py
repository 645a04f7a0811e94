"""mergekit's model+adapter form: a PEFT LoRA adapter applied to its model. Checked against
PEFT's own merge_and_unload (which mergekit runs) on adapters PEFT writes, then merged through
the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_folder, random_llama, rewrite_safetensors
from lora_adapters import write_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergeflow.adapted_tensor import READ_BLOCK, AdaptedTensor, ReadMemo
from mergeflow.checkpoint import open_checkpoint
from mergeflow.cli import app
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError, NonFiniteError
from mergeflow.file_hashes import cache_dir
from mergeflow.hashing import model_sha256_at
from mergeflow.methods.primitives import to_float32
from mergeflow.safetensors_io import TensorFileReader
from mergeflow.scratch import process_tagged


def checkpoint_tensors(ref: str, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every tensor of the opened checkpoint `ref` in float32, and the names of those its
    adapter changes (computed as they are read)."""
    checkpoint, reader = open_checkpoint(ref, allow_pickle), TensorFileReader()
    try:
        values = {
            name: torch.from_numpy(to_float32(reader.read(e, 0, e.numel)).reshape(e.shape))
            for name, e in checkpoint.tensors.items()
        }
        return values, {name for name, e in checkpoint.tensors.items() if isinstance(e, AdaptedTensor)}
    finally:
        reader.close()
        checkpoint.close()


def save_model_and_adapter(folder: Path, make_model, dtype: torch.dtype, lora: LoraConfig, edit=None):
    """`make_model()` saved in `dtype`, a PEFT adapter trained on nothing but random (so
    every factor is non-zero), and PEFT's merge_and_unload of the two as a state dict."""
    make_model().to(dtype).save_pretrained(folder / "model")
    peft_model = get_peft_model(make_model().to(dtype), lora)
    if edit:
        edit(peft_model)
    # What PEFT does when an embedding is targeted ("auto"), said explicitly: no warning.
    peft_model.save_pretrained(
        folder / "adapter", save_embedding_layers="embed_tokens" in lora.target_modules
    )
    loaded = type(make_model()).from_pretrained(folder / "model", dtype=dtype)
    merged = PeftModel.from_pretrained(loaded, folder / "adapter").merge_and_unload()
    return {name: value.float() for name, value in merged.state_dict().items()}


def perturb_saved_head(peft_model) -> None:
    """modules_to_save copies lm_head; change the copy so replacing the head shows."""
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)


LLAMA_LORA = dict(
    r=4,
    lora_alpha=8,
    init_lora_weights=False,
    target_modules=["q_proj", "v_proj", "embed_tokens"],
    modules_to_save=["lm_head"],
    rank_pattern={"layers.1.self_attn.q_proj": 2},
    alpha_pattern={"v_proj": 3},
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_an_adapter_is_applied_exactly_as_peft_merge_and_unload_applies_it(tmp_path, dtype):
    # Linear layers, an embedding (whose delta PEFT rounds before adding), a saved lm_head,
    # and per-module rank and alpha.
    expected = save_model_and_adapter(
        tmp_path, lambda: random_llama(64), dtype, LoraConfig(**LLAMA_LORA), perturb_saved_head
    )
    ours, adapted = checkpoint_tensors(f"{tmp_path}/model+{tmp_path}/adapter")
    original, _ = checkpoint_tensors(str(tmp_path / "model"))
    assert ours.keys() == expected.keys()
    for name in ours:
        assert torch.equal(ours[name], expected[name]), name
    changed = {name for name in ours if not torch.equal(ours[name], original[name])}
    assert changed == {
        "lm_head.weight",
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")),
    }
    # Only the tensors the adapter changes are computed; the rest are read where they are.
    assert adapted == changed


def tiny_gpt2():
    """A GPT-2 of random weights, whose attention is a Conv1D (fan-in-fan-out) layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16))


def test_conv1d_layers_with_fan_in_fan_out_and_rslora_match_peft(tmp_path):
    lora = LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        init_lora_weights=False,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    expected = save_model_and_adapter(tmp_path, tiny_gpt2, torch.bfloat16, lora)
    ours, _ = checkpoint_tensors(f"{tmp_path}/model+{tmp_path}/adapter")
    original, _ = checkpoint_tensors(str(tmp_path / "model"))
    assert not torch.equal(
        ours["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.weight"]
    )
    for name in ours:
        assert torch.equal(ours[name], expected[name]), name


def test_a_merge_of_experts_given_as_model_plus_adapter(zoo, tmp_path, monkeypatch):
    # A cache of its own: the test workers share one, where other tests' merges make scratch files.
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    base = zoo["base"]
    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "o")]
    adapters = [write_adapter(tmp_path / f"adapter-{k}", base, modules, seed=k) for k in range(2)]
    refs = [f"{base}+{adapter}" for adapter in adapters]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": ref, "parameters": {"weight": 0.7}} for ref in refs],
        "dtype": "float32",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "merge.yaml"), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    merged, base_tensors = load_folder(out), load_folder(base)
    applied = [checkpoint_tensors(ref)[0] for ref in refs]
    for name, value in merged.items():
        expected = base_tensors[name] + sum(0.7 * (a[name] - base_tensors[name]) for a in applied)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(merged[f"{modules[0]}.weight"], base_tensors[f"{modules[0]}.weight"])
    manifest = json.loads((out / "mergeflow-manifest.json").read_text())
    assert [m["ref"] for m in manifest["inputs"]["models"]] == refs
    # The two adapted models differ, and so do their recorded hashes.
    assert len({m["sha256"] for m in manifest["inputs"]["models"]}) == 2
    # Nothing was written to a scratch folder, and the recorded hash is over the model's and
    # the adapter's files.
    assert not list((cache_dir() / "scratch").glob("*"))
    remembered = json.loads((cache_dir() / "file-hashes.json").read_text())
    assert not [path for path in remembered if "/scratch/" in path]
    for ref, adapter, recorded in zip(refs, adapters, manifest["inputs"]["models"], strict=True):
        assert recorded["sha256"] == adapted_model_hash(Path(base), adapter), ref
        assert model_sha256_at(recorded["ref"]) == recorded["sha256"]  # without applying it again


def adapted_model_hash(model: Path, adapter: Path) -> str:
    """The content hash of model+adapter as documented: sha256 over sorted 'name sha256' lines
    of the model's config.json and weight files and of the adapter's two files."""
    files = {"config.json": model / "config.json"}
    files |= {f.name: f for f in model.glob("*.safetensors")}
    files |= {
        f"adapter/{f.name}": f
        for f in (adapter / "adapter_config.json", adapter / "adapter_model.safetensors")
    }
    lines = [f"{name} {hashlib.sha256(files[name].read_bytes()).hexdigest()}" for name in sorted(files)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_a_merge_that_fails_opening_its_inputs_names_the_first_and_leaves_no_scratch(zoo, tmp_path):
    # The inputs open on two threads; the error is still the first bad model's in the config's
    # order, and nothing of those that opened is left.
    adapters = [
        write_adapter(tmp_path / f"lora-{k}", zoo["base"], ["model.layers.0.mlp.up_proj"]) for k in (0, 1)
    ]
    models = [f"{zoo['base']}+{adapters[0]}", str(tmp_path / "missing-a"), f"{zoo['base']}+{adapters[1]}"]
    config = {
        "merge_method": "linear",
        "models": [{"model": m} for m in models + [str(tmp_path / "missing-b")]],
    }
    with pytest.raises(CheckpointError, match="missing-a"):
        merge(parse_config(config), str(tmp_path / "merged"), threads=2)
    assert not list((cache_dir() / "scratch").glob("*"))
    assert not (tmp_path / "merged").exists()


def test_the_hash_of_model_plus_adapter_is_taken_without_applying_the_adapter(zoo, tmp_path):
    adapter = write_adapter(tmp_path / "lora", zoo["base"], ["model.layers.0.mlp.up_proj"])
    module = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    rewrite_safetensors(adapter / "adapter_model.safetensors", lambda t: t[module].fill_(float("inf")))
    ref = f"{zoo['base']}+{adapter}"
    with pytest.raises(NonFiniteError, match="with the adapter applied"):  # merging it fails ...
        merge(parse_config({"merge_method": "linear", "models": [{"model": ref}]}), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert model_sha256_at(ref) == adapted_model_hash(Path(zoo["base"]), adapter)  # ... hashing does not


def test_reading_checkpoints_loads_numba_only_to_apply_an_adapter():
    script = "import sys, mergeflow.checkpoint; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def pickled_adapter(tmp_path: Path) -> Path:
    """A model and adapter saved by PEFT in tmp_path, and the adapter as older PEFT saved it
    (adapter_model.bin) in tmp_path / "pickled-adapter"."""
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    save_model_and_adapter(tmp_path, lambda: random_llama(64), torch.bfloat16, lora)
    pickled = tmp_path / "pickled-adapter"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((tmp_path / "adapter" / "adapter_config.json").read_bytes())
    torch.save(load_file(tmp_path / "adapter" / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    return pickled


def test_an_adapter_saved_as_a_pickle_by_older_peft_needs_allow_pickle(tmp_path):
    pickled = pickled_adapter(tmp_path)
    ref = f"{tmp_path}/model+{pickled}"
    with pytest.raises(CheckpointError) as refused:
        open_checkpoint(ref)
    assert str(refused.value) == (
        f"model '{ref}': adapter '{pickled}': only pickle weights (adapter_model.bin); pickle can run "
        "code when loaded, so it is refused: convert to safetensors or pass --allow-pickle"
    )
    ours, _ = checkpoint_tensors(ref, allow_pickle=True)
    expected, _ = checkpoint_tensors(f"{tmp_path}/model+{tmp_path}/adapter")
    assert ours.keys() == expected.keys()
    for name in ours:
        assert torch.equal(ours[name], expected[name]), name


def test_scratch_folders_of_killed_processes_go_when_the_next_pickle_is_converted(tmp_path):
    scratch = cache_dir() / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    abandoned = scratch / process_tagged("checkpoint", int(ended.stdout))
    abandoned.mkdir()
    (abandoned / "adapter_model.safetensors").write_bytes(b"left by a killed merge")
    running = scratch / process_tagged("checkpoint", os.getppid())  # a live process's: kept
    running.mkdir()
    pickled = pickled_adapter(tmp_path)
    try:
        checkpoint = open_checkpoint(f"{tmp_path}/model+{pickled}", allow_pickle=True)
        assert not abandoned.exists() and running.exists()
        checkpoint.close()
        assert {p.name for p in scratch.iterdir()} == {running.name}  # its own folder went on close
    finally:
        running.rmdir()


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d"])
def test_an_adapted_tensor_has_the_same_bits_however_it_is_read(tmp_path, monkeypatch, kind):
    """Any range, read alone or in blocks of whole rows, gives the bits of the whole tensor: the
    merge's chunking cannot change an adapted model. (An embedding's delta and a fan-in-fan-out
    layer's are transposed.)"""
    if kind == "conv1d":
        lora = LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False, target_modules=["c_attn"], fan_in_fan_out=True
        )
        expected = save_model_and_adapter(tmp_path, tiny_gpt2, torch.bfloat16, lora)
        name = "transformer.h.0.attn.c_attn.weight"
    else:
        lora = LoraConfig(
            r=8, lora_alpha=16, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"]
        )
        expected = save_model_and_adapter(tmp_path, lambda: random_llama(64), torch.bfloat16, lora)
        name = (
            "model.embed_tokens.weight" if kind == "embedding" else "model.layers.0.self_attn.q_proj.weight"
        )
    checkpoint = open_checkpoint(f"{tmp_path}/model+{tmp_path}/adapter")
    entry = checkpoint.tensors[name]
    assert isinstance(entry, AdaptedTensor) and entry.update.transposed == (kind != "linear")
    try:
        reader = TensorFileReader()
        whole = reader.read(entry, 0, entry.numel).copy()
        reader.close()
        assert torch.equal(torch.from_numpy(to_float32(whole)).reshape(entry.shape), expected[name].float())
        rng = np.random.default_rng(0)
        # Factors kept whole while the tensor is read, or (no room) read a range at a time.
        for memo_bytes in (ReadMemo.MEMO_BYTES, 0):
            monkeypatch.setattr(ReadMemo, "MEMO_BYTES", memo_bytes)
            for block in (1, entry.shape[-1] - 1, 3 * entry.shape[-1] + 5, READ_BLOCK):
                monkeypatch.setattr("mergeflow.adapted_tensor.READ_BLOCK", block)
                reader = TensorFileReader()
                for _ in range(20):
                    start = int(rng.integers(0, entry.numel))
                    count = int(rng.integers(1, entry.numel - start + 1))
                    assert np.array_equal(reader.read(entry, start, count), whole[start : start + count])
                reader.close()
    finally:
        checkpoint.close()


def test_a_ties_merge_of_adapters_is_the_same_whether_the_adapted_tensors_are_kept_or_computed_again(
    zoo, tmp_path, monkeypatch
):
    """TIES reads each tensor whole for its statistics, then in chunks: the chunks are copies of
    the values the whole read kept, or, with no room to keep them, computed again."""
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)] + ["model.layers.0.mlp.down_proj"]
    refs = [
        f"{zoo['base']}+{write_adapter(tmp_path / f'lora-{k}', zoo['base'], modules, seed=k)}" for k in (0, 1)
    ]
    config = parse_config(
        {
            "merge_method": "ties",
            "base_model": zoo["base"],
            "models": [{"model": ref, "parameters": {"density": 0.3, "weight": 1.0}} for ref in refs],
        }
    )
    merged = {}
    for memo_bytes in (ReadMemo.MEMO_BYTES, 0):
        monkeypatch.setattr(ReadMemo, "MEMO_BYTES", memo_bytes)
        out = tmp_path / f"merged-{memo_bytes}"
        merge(config, str(out), work_bytes=64 << 10)  # small chunks: several per tensor
        merged[memo_bytes] = load_folder(out)
    kept, computed = merged.values()
    assert kept.keys() == computed.keys()
    for name in kept:
        assert torch.equal(kept[name], computed[name]), name
