"""Bad LoRA adapters in mergekit's model+adapter form: a clear one-line error naming the model
reference and the adapter's file, tensor or setting; nothing left that looks like an output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import rewrite_safetensors
from lora_adapters import write_adapter

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError, NonFiniteError
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, str]:
    return build_generated_zoo(
        tmp_path_factory.mktemp("bad-adapters"), GeneratedZooSpec(num_experts=1, seed=3)
    )


def merge_with(small, ref: str, tmp_path: Path, error: type = CheckpointError) -> str:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": small["base"],
        "models": [{"model": small["expert_0"]}, {"model": ref}],
    }
    out = tmp_path / "out" / "merged"
    with pytest.raises(error) as caught:
        merge(parse_config(config), str(out))
    message = str(caught.value)
    assert "\n" not in message
    assert f"model '{ref}'" in message, message
    assert not (out.parent.exists() and any(out.parent.iterdir())), "a partial output was left behind"
    return message


def adapter(small, tmp_path: Path, **settings) -> Path:
    return write_adapter(tmp_path / "adapter", small["base"], [Q_PROJ], settings=settings)


def edit_adapter_tensors(folder: Path, edit) -> None:
    rewrite_safetensors(folder / "adapter_model.safetensors", edit)


def test_an_adapter_that_is_not_there(small, tmp_path):
    message = merge_with(small, f"{small['base']}+{tmp_path / 'absent'}", tmp_path)
    assert "not found or not a folder" in message and "PEFT adapter folder" in message


def test_a_folder_without_adapter_files(small, tmp_path):
    message = merge_with(small, f"{small['base']}+{small['expert_0']}", tmp_path)
    assert "not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)" in message


def test_an_adapter_given_as_a_model(small, tmp_path):
    folder = adapter(small, tmp_path)
    assert merge_with(small, str(folder), tmp_path) == (
        f"model '{folder}': a LoRA adapter (adapter_config.json), not a model: give it with the model "
        f"it adapts, as MODEL+{folder} (mergekit's model+adapter form)"
    )


def test_more_than_one_plus(small, tmp_path):
    folder = adapter(small, tmp_path)
    message = merge_with(small, f"{small['base']}+{folder}+{folder}", tmp_path)
    assert "write a model with an adapter as 'MODEL+ADAPTER' (one '+')" in message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported (only LORA adapters)"),
        ({"use_dora": True}, "DoRA adapters are not supported (adapter_config.json sets use_dora)"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication (it adds layers) are not supported"),
        ({"lora_alpha": -1}, "adapter_config.json needs a positive number for 'lora_alpha'"),
        ({"r": 8}, f"module '{Q_PROJ}': factors of shapes [64, 4] and [4, 64] do not have the rank r=8"),
        ({"rank_pattern": {"q_proj": 2}}, "do not have the rank r=2 the adapter config gives it"),
        ({"alpha_pattern": {"q_proj[": 2}}, "alpha_pattern key 'q_proj[' is not a regular expression"),
    ],
    ids=["not-lora", "dora", "layer-replication", "alpha", "rank", "rank-pattern", "bad-pattern"],
)
def test_adapter_settings_that_do_not_fit(small, tmp_path, settings, expected):
    message = merge_with(small, f"{small['base']}+{adapter(small, tmp_path, **settings)}", tmp_path)
    assert expected in message, message


def test_an_adapter_config_that_is_not_json(small, tmp_path):
    folder = adapter(small, tmp_path)
    (folder / "adapter_config.json").write_text("{r: 4")
    assert "adapter_config.json is not valid JSON" in merge_with(small, f"{small['base']}+{folder}", tmp_path)


def test_a_factor_without_its_partner(small, tmp_path):
    folder = adapter(small, tmp_path)
    edit_adapter_tensors(folder, lambda t: t.pop(f"base_model.model.{Q_PROJ}.lora_B.weight"))
    message = merge_with(small, f"{small['base']}+{folder}", tmp_path)
    assert f"module '{Q_PROJ}' has only one of its two LoRA factors" in message


def test_a_module_the_model_does_not_have(small, tmp_path):
    folder = adapter(small, tmp_path)
    prefix, absent = f"base_model.model.{Q_PROJ}", "base_model.model.model.layers.9.self_attn.q_proj"
    edit_adapter_tensors(folder, lambda t: t.update({k.replace(prefix, absent): t.pop(k) for k in list(t)}))
    message = merge_with(small, f"{small['base']}+{folder}", tmp_path)
    assert "changes tensor 'model.layers.9.self_attn.q_proj.weight', which the model does not have" in message


def test_an_adapter_for_a_model_of_another_size(small, tmp_path):
    folder = adapter(small, tmp_path)
    edit_adapter_tensors(
        folder, lambda t: t.update({f"base_model.model.{Q_PROJ}.lora_A.weight": torch.ones(4, 96)})
    )
    message = merge_with(small, f"{small['base']}+{folder}", tmp_path)
    assert f"gives tensor '{Q_PROJ}.weight' shape [64, 96], the model's is [64, 64]" in message


def test_an_adapter_tensor_of_an_unsupported_kind(small, tmp_path):
    folder = adapter(small, tmp_path)
    name = f"base_model.model.{Q_PROJ}.lora_magnitude_vector"  # DoRA's, in a config without use_dora
    edit_adapter_tensors(folder, lambda t: t.update({name: torch.ones(64)}))
    message = merge_with(small, f"{small['base']}+{folder}", tmp_path)
    assert f"tensor '{name}' is not a LoRA factor or a saved module (unsupported adapter)" in message


def test_nan_in_an_adapter_names_the_model_and_tensor(small, tmp_path):
    folder = adapter(small, tmp_path)
    edit_adapter_tensors(
        folder, lambda t: t[f"base_model.model.{Q_PROJ}.lora_A.weight"].__setitem__((0, 0), float("nan"))
    )
    message = merge_with(small, f"{small['base']}+{folder}", tmp_path, NonFiniteError)
    assert f"tensor '{Q_PROJ}.weight' holds 64 NaN/Inf value(s) with the adapter applied" in message


def test_an_adapter_config_naming_no_tensors(small, tmp_path):
    folder = adapter(small, tmp_path)
    edit_adapter_tensors(folder, lambda t: t.clear())
    assert "holds no LoRA tensors" in merge_with(small, f"{small['base']}+{folder}", tmp_path)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_bad_later_model_is_refused_before_any_adapter_is_read(small, tmp_path):
    """Reading the first expert's adapted tensors would fail on its NaN; the missing second
    expert is named instead, as every model is found and checked before any tensor is read."""
    folder = adapter(small, tmp_path)
    edit_adapter_tensors(
        folder, lambda t: t[f"base_model.model.{Q_PROJ}.lora_A.weight"].__setitem__((0, 0), float("nan"))
    )
    missing = str(tmp_path / "missing-expert")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": small["base"],
        "models": [{"model": f"{small['base']}+{folder}"}, {"model": missing}],
    }
    with pytest.raises(CheckpointError, match=f"model '{missing}': not found or not a folder"):
        merge(parse_config(config), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_manifest_beside_an_adapter_that_is_not_json(small, tmp_path):
    folder = adapter(small, tmp_path)
    (folder / "mergeflow-manifest.json").write_text("{not json")
    message = merge_with(small, f"{small['base']}+{folder}", tmp_path)
    assert ": adapter: mergeflow-manifest.json is not valid JSON" in message
