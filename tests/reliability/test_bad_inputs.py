"""Bad input: a clear one-line error naming the model, file, tensor or field, raised before
heavy work where possible, and nothing left behind that looks like an output."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import rewrite_safetensors
from safetensors.torch import load_file

from mergeflow.checkpoint import MANIFEST
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import (
    CheckpointError,
    ConfigError,
    IncompatibleModelsError,
    NonFiniteError,
    StorageError,
)
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, str]:
    """A zoo whose experts are single-file checkpoints (easy to corrupt)."""
    return build_generated_zoo(tmp_path_factory.mktemp("bad"), GeneratedZooSpec(num_experts=2, seed=9))


@pytest.fixture(scope="module")
def small_bf16(tmp_path_factory) -> dict[str, str]:
    """The same in bfloat16, which the statistics kernels read as raw bit patterns."""
    spec = GeneratedZooSpec(num_experts=2, seed=9, dtype="bfloat16")
    return build_generated_zoo(tmp_path_factory.mktemp("bad-bf16"), spec)


def copy_expert(small, tmp_path: Path, name: str = "broken") -> Path:
    target = tmp_path / name
    shutil.copytree(small["expert_1"], target)
    return target


def ties(small, second: str | Path) -> dict:
    return {
        "merge_method": "ties",
        "base_model": small["base"],
        "models": [{"model": small["expert_0"]}, {"model": str(second)}],
        "parameters": {"density": 0.5},
    }


def assert_fails_cleanly(config: dict, tmp_path: Path, error: type, *fragments: str, **kwargs) -> str:
    out = tmp_path / "out" / "merged"
    with pytest.raises(error) as caught:
        merge(parse_config(config), str(out), **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not (out.parent.exists() and any(out.parent.iterdir())), "a partial output was left behind"
    return message


def edit_tensors(folder: Path, edit) -> None:
    rewrite_safetensors(folder / "model.safetensors", edit)


def test_architectures_differ(small, tmp_path):
    broken = copy_expert(small, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(
        ties(small, broken),
        tmp_path,
        IncompatibleModelsError,
        "architectures differ",
        "MistralForCausalLM",
        "--allow-crimes merges them",
    )


def test_allow_crimes_still_refuses_tensors_that_differ(small, tmp_path):
    broken = copy_expert(small, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForCausalLM"]}))
    edit_tensors(broken, lambda tensors: tensors.pop("model.norm.weight"))
    assert_fails_cleanly(
        ties(small, broken), tmp_path, IncompatibleModelsError, "lacks 'model.norm.weight'", allow_crimes=True
    )


def test_vocab_sizes_differ(small, tmp_path):
    broken = copy_expert(small, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(ties(small, broken), tmp_path, IncompatibleModelsError, "vocab sizes differ", "257")


def test_a_tokenizer_source_without_tokenizer_files(small, tmp_path):
    config = ties(small, small["expert_1"]) | {"tokenizer": {"source": small["expert_0"]}}
    assert_fails_cleanly(
        config, tmp_path, ConfigError, f"tokenizer source '{small['expert_0']}' has no tokenizer files"
    )


def test_a_tokenizer_source_whose_tokenizer_cannot_be_read(small, tmp_path):
    other = copy_expert(small, tmp_path, "other-tokenizer")
    (other / "tokenizer.json").write_text("{}")
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 1  # so its vocabulary is read, to realign the models to it
    (other / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(
        ties(small, small["expert_1"]) | {"tokenizer_source": str(other)},
        tmp_path,
        CheckpointError,
        f"model '{other}': cannot load its tokenizer",
    )


def test_a_chat_template_for_a_tokenizer_source_without_tokenizer_config(small, tmp_path):
    config = ties(small, small["expert_1"]) | {"chat_template": "{{ messages }}"}
    assert_fails_cleanly(
        config, tmp_path, ConfigError, f"'{small['base']}' has no tokenizer_config.json to carry it"
    )


def test_a_chat_template_for_a_tokenizer_config_that_is_not_json(small, tmp_path):
    other = copy_expert(small, tmp_path, "bad-tokenizer-config")
    (other / "tokenizer_config.json").write_text("{not json")
    settings = {"chat_template": "{{ messages }}", "tokenizer_source": str(other)}
    config = ties(small, small["expert_1"]) | settings
    assert_fails_cleanly(
        config, tmp_path, CheckpointError, str(other / "tokenizer_config.json"), "not valid JSON"
    )


def test_padding_a_vocabulary_without_a_tokenizer(small, tmp_path):
    config = ties(small, small["expert_1"]) | {"tokenizer": {"source": "base", "pad_to_multiple_of": 7}}
    assert_fails_cleanly(
        config,
        tmp_path,
        ConfigError,
        f"tokenizer source 'base': model '{small['base']}' has no tokenizer files",
    )


def test_della_chances_outside_0_1_are_refused_before_any_work(small, tmp_path):
    config = ties(small, small["expert_1"]) | {"merge_method": "della"}
    config["models"][1]["parameters"] = {"density": 0.9, "epsilon": 0.15}
    assert_fails_cleanly(
        config,
        tmp_path,
        ConfigError,
        f"models[1] ('{small['expert_1']}'), tensor 'model.embed_tokens.weight': density 0.9 ± epsilon 0.15",
        "leaves (0, 1)",
    )


def test_della_refusals_name_the_expert_as_the_config_lists_it(small, tmp_path):
    # mergekit configs often list the base first under models; it is not an expert.
    config = ties(small, small["expert_1"]) | {"merge_method": "della"}
    config["models"] = [{"model": small["base"]}, *config["models"]]
    config["models"][2]["parameters"] = {"density": 0.9, "epsilon": 0.15}
    assert_fails_cleanly(config, tmp_path, ConfigError, f"models[2] ('{small['expert_1']}')")


def test_della_chances_are_checked_for_each_tensor_of_a_gradient(small, tmp_path):
    # density rises from 0.5 (layer 0 and tensors outside layers) to 0.9 (the last layer).
    config = ties(small, small["expert_1"]) | {"merge_method": "della", "parameters": {"density": [0.5, 0.9]}}
    message = assert_fails_cleanly(config, tmp_path, ConfigError, "models[0] (", "density 0.9 ± epsilon 0.15")
    assert "tensor 'model.layers.1." in message


def test_tensor_shapes_differ(small, tmp_path):
    broken = copy_expert(small, tmp_path)
    edit_tensors(broken, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    assert_fails_cleanly(ties(small, broken), tmp_path, IncompatibleModelsError, "model.norm.weight", "[65]")


def test_integer_weights_where_the_base_has_floats(small, tmp_path):
    broken = copy_expert(small, tmp_path)
    edit_tensors(broken, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    assert_fails_cleanly(
        ties(small, broken), tmp_path, IncompatibleModelsError, "model.norm.weight", "dtype int32"
    )


def test_missing_tensor(small, tmp_path):
    # even the output head: its config does not tie it to the embeddings (tests/test_tensor_tables.py)
    broken = copy_expert(small, tmp_path)
    edit_tensors(broken, lambda t: t.pop("lm_head.weight"))
    assert_fails_cleanly(ties(small, broken), tmp_path, IncompatibleModelsError, "lacks 'lm_head.weight'")


@pytest.mark.parametrize("zoo", ["small", "small_bf16"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(zoo, tmp_path, bad_value, request):
    small = request.getfixturevalue(zoo)
    broken = copy_expert(small, tmp_path)

    def poison(tensors):
        tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad_value

    edit_tensors(broken, poison)
    for method in ("ties", "task_arithmetic", "della", "sce"):
        config = ties(small, broken) | {"merge_method": method}
        if method in ("task_arithmetic", "sce"):
            config["parameters"] = {"select_topk": 0.5} if method == "sce" else {}
        assert_fails_cleanly(
            config, tmp_path, NonFiniteError, "model.layers.1.mlp.down_proj.weight", str(broken), "NaN/Inf"
        )


@pytest.mark.parametrize("zoo", ["small", "small_bf16"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_when_copied_by_passthrough(zoo, tmp_path, bad_value, request):
    small = request.getfixturevalue(zoo)
    broken = copy_expert(small, tmp_path)
    edit_tensors(broken, lambda t: t["model.layers.0.self_attn.o_proj.weight"].__setitem__((2, 1), bad_value))
    config = {"merge_method": "passthrough", "models": [{"model": str(broken)}]}
    assert_fails_cleanly(
        config, tmp_path, NonFiniteError, "model.layers.0.self_attn.o_proj.weight", str(broken), "NaN/Inf"
    )


def test_truncated_safetensors(small, tmp_path):
    broken = copy_expert(small, tmp_path)
    file = broken / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    assert_fails_cleanly(ties(small, broken), tmp_path, CheckpointError, "truncated", "model.safetensors")


def test_garbage_safetensors_header(small, tmp_path):
    broken = copy_expert(small, tmp_path)
    file = broken / "model.safetensors"
    data = file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    file.write_bytes(data[:8] + b"{not json" + data[17:])
    assert_fails_cleanly(ties(small, broken), tmp_path, CheckpointError, "corrupt safetensors header")
    file.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    assert_fails_cleanly(ties(small, broken), tmp_path, CheckpointError, "corrupt safetensors header")


def test_corrupt_index_json(zoo, tmp_path):
    broken = tmp_path / "sharded"
    shutil.copytree(zoo["expert_1"], broken)
    (broken / "model.safetensors.index.json").write_text("{ nope")
    config = {"merge_method": "average", "models": [{"model": zoo["expert_0"]}, {"model": str(broken)}]}
    assert_fails_cleanly(config, tmp_path, CheckpointError, "model.safetensors.index.json", "not valid JSON")


def test_index_names_a_missing_shard(zoo, tmp_path):
    broken = tmp_path / "sharded"
    shutil.copytree(zoo["expert_1"], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    config = {"merge_method": "average", "models": [{"model": zoo["expert_0"]}, {"model": str(broken)}]}
    assert_fails_cleanly(config, tmp_path, CheckpointError, shard.name, "missing")


def test_pickle_only_checkpoint_is_refused_unless_allowed(small, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(Path(small["expert_1"]) / "config.json", pickled)
    torch.save(load_file(Path(small["expert_1"]) / "model.safetensors"), pickled / "pytorch_model.bin")
    message = assert_fails_cleanly(ties(small, pickled), tmp_path, CheckpointError, "pytorch_model.bin")
    assert "--allow-pickle" in message
    out = tmp_path / "allowed"
    merge(parse_config(ties(small, pickled)), str(out), allow_pickle=True)
    reference = tmp_path / "reference"
    merge(parse_config(ties(small, small["expert_1"])), str(reference))
    assert load_file(out / "model.safetensors").keys() == load_file(reference / "model.safetensors").keys()
    for name, tensor in load_file(reference / "model.safetensors").items():
        assert torch.equal(load_file(out / "model.safetensors")[name], tensor)
    # Its recorded hash is over the files the user gave, the pickle among them.
    (recorded,) = [
        m for m in json.loads((out / MANIFEST).read_text())["inputs"]["models"] if m["ref"] == str(pickled)
    ]
    lines = [
        f"{n} {hashlib.sha256((pickled / n).read_bytes()).hexdigest()}"
        for n in ("config.json", "pytorch_model.bin")
    ]
    assert recorded["sha256"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_missing_model_folder(small, tmp_path):
    assert_fails_cleanly(ties(small, tmp_path / "nope"), tmp_path, CheckpointError, str(tmp_path / "nope"))


@pytest.mark.parametrize("out", ["the expert", "its parent folder"])
def test_an_output_that_would_replace_an_input_is_refused_even_with_overwrite(small, tmp_path, out):
    expert = copy_expert(small, tmp_path / "models", "expert")
    before = {f.name: f.read_bytes() for f in expert.iterdir()}
    target = expert if out == "the expert" else expert.parent
    with pytest.raises(ConfigError) as refused:
        merge(parse_config(ties(small, expert)), str(target), overwrite=True)
    assert str(refused.value) == (
        f"output '{target}': model '{expert}' is read from there, and the output would replace it; "
        "write the merge elsewhere"
    )
    assert {f.name: f.read_bytes() for f in expert.iterdir()} == before
    assert sorted(p.name for p in expert.parent.iterdir()) == ["expert"]


def test_an_output_that_cannot_be_written_there(small, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "merged"
    with pytest.raises(StorageError) as refused:
        merge(parse_config(ties(small, small["expert_1"])), str(out))
    assert str(refused.value).startswith(f"{out}: cannot write the output there: ")
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_folder_without_weights(small, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert_fails_cleanly(ties(small, empty), tmp_path, CheckpointError, "no *.safetensors")


def test_a_gguf_model_is_named_as_such(small, tmp_path):
    folder = tmp_path / "quantised"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert_fails_cleanly(
        ties(small, folder),
        tmp_path,
        CheckpointError,
        "no *.safetensors weights found (model-Q4_K_M.gguf is GGUF, which mergeflow does not read",
    )


@pytest.mark.parametrize("method", ["average", "model_stock", "ram", "ramplus_tl", "arcee_fusion"])
def test_non_finite_weights_are_named_for_methods_without_sparsification(small, tmp_path, method):
    broken = copy_expert(small, tmp_path)
    edit_tensors(broken, lambda t: t["model.norm.weight"].__setitem__(7, float("nan")))
    config = ties(small, broken) | {"merge_method": method, "parameters": {}}
    if method == "arcee_fusion":  # it merges one model into the base
        config["models"] = [{"model": str(broken)}]
    assert_fails_cleanly(config, tmp_path, NonFiniteError, "model.norm.weight", str(broken))


@pytest.mark.parametrize("zoo", ["small", "small_bf16"])
def test_overflowing_merge_is_refused(zoo, request, tmp_path):
    small = request.getfixturevalue(zoo)
    config = ties(small, small["expert_1"]) | {
        "merge_method": "task_arithmetic",
        "parameters": {"lambda": 1e30, "weight": 1e30},
    }
    assert_fails_cleanly(config, tmp_path, NonFiniteError, "overflow", "lambda")
