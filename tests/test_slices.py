"""Layer slices (mergekit's `slices:`): the output's layers built slice by slice from ranges of
its sources' layers. Outputs are checked against state dicts put together here by hand, and
load with transformers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_folder, rewrite_safetensors
from reference_merge import reference_merge

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import ConfigError, IncompatibleModelsError
from mergeflow.task_vectors import ensure_task_vector
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

LAYER = re.compile(r"\.layers\.(\d+)\.")


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, str]:
    """base + 2 experts of 4 layers each, one file each (so tests can edit them)."""
    spec = GeneratedZooSpec(num_layers=4, num_experts=2, seed=4)
    return build_generated_zoo(tmp_path_factory.mktemp("deep"), spec)


@pytest.fixture(scope="module")
def deep_bf16(tmp_path_factory) -> dict[str, str]:
    spec = GeneratedZooSpec(num_layers=4, num_experts=1, dtype="bfloat16", seed=5)
    return build_generated_zoo(tmp_path_factory.mktemp("deep-bf16"), spec)


def layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def stacked(parts: list[tuple[dict, int]], first: dict, last: dict) -> dict[str, torch.Tensor]:
    """A state dict whose k-th layer is layer parts[k][1] of state dict parts[k][0], with the
    embeddings of `first` and the other tensors outside the layers of `last`."""
    out = {name: t for name, t in first.items() if layer_of(name) is None and "embed" in name}
    for k, (state, layer) in enumerate(parts):
        for name, tensor in state.items():
            if layer_of(name) == layer:
                out[LAYER.sub(f".layers.{k}.", name)] = tensor
    out |= {name: t for name, t in last.items() if layer_of(name) is None and "embed" not in name}
    return out


def slices(*ranges: tuple[str, int, int], **parameters) -> list[dict]:
    return [
        {"sources": [{"model": model, "layer_range": [start, end]} | parameters.get(model, {})]}
        for model, start, end in ranges
    ]


def edited_copy(model: str, target: Path, edit) -> Path:
    """A copy of a model whose tensors `edit` changed in place (a dict of name to tensor)."""
    shutil.copytree(model, target)
    (target / "mergeflow-manifest.json").unlink(missing_ok=True)  # its hashes no longer hold
    rewrite_safetensors(target / "model.safetensors", edit)
    return target


def refusal(config: dict, tmp_path: Path, error: type[Exception] = ConfigError) -> str:
    """The one-line error a merge of `config` stops with, having written nothing."""
    with pytest.raises(error) as refused:
        merge(parse_config(config), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    return str(refused.value)


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_passthrough_stacks_layers_of_two_models(deep, tmp_path):
    config = {
        "merge_method": "passthrough",
        "slices": slices((deep["expert_0"], 0, 3), (deep["expert_1"], 1, 4)),
    }
    result = merge(parse_config(config), str(tmp_path / "out"))
    a, b = load_folder(deep["expert_0"]), load_folder(deep["expert_1"])
    expected = stacked([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)], first=a, last=b)
    assert_same_tensors(load_folder(tmp_path / "out"), expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    assert [m["ref"] for m in result.manifest["inputs"]["models"]] == [deep["expert_0"], deep["expert_1"]]
    assert result.manifest["inputs"]["base"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| 0–2 | `{deep['expert_0']}` layers 0–2 |\n| 3–5 | `{deep['expert_1']}` layers 1–3 |" in card

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_depth_up_scaling_repeats_layers_of_one_model_and_scales_by_filter(deep, tmp_path):
    # SOLAR-style: the model's first three layers, then its last three, the repeated ones'
    # output projections halved
    halved = {"parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}
    config = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": deep["base"], "layer_range": [0, 3]}]},
            {"sources": [{"model": deep["base"], "layer_range": [1, 4]} | halved]},
        ],
    }
    result = merge(parse_config(config), str(tmp_path / "out"))
    base = load_folder(deep["base"])
    expected = stacked([(base, 0), (base, 1), (base, 2), (base, 1), (base, 2), (base, 3)], base, base)
    for name in expected:
        if "o_proj" in name and layer_of(name) >= 3:
            expected[name] = expected[name] * 0.5
    assert_same_tensors(load_folder(tmp_path / "out"), expected)
    assert [m["ref"] for m in result.manifest["inputs"]["models"]] == [deep["base"]]  # once


def test_bfloat16_layers_are_copied_bit_for_bit_and_scaled_with_one_rounding(deep_bf16, tmp_path):
    scaled = {"parameters": {"scale": [{"filter": "down_proj", "value": 0.3}, {"value": 1.0}]}}
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": deep_bf16["base"], "layer_range": [0, 4]}]},
            {"sources": [{"model": deep_bf16["base"], "layer_range": [2, 4]} | scaled]},
        ],
    }
    merge(parse_config(config), str(tmp_path / "out"))
    base = load_folder(deep_bf16["base"])
    expected = stacked([(base, i) for i in (0, 1, 2, 3, 2, 3)], base, base)
    for name in expected:
        if "down_proj" in name and layer_of(name) >= 4:  # float32 product, rounded to bf16 once
            expected[name] = (expected[name].float() * torch.tensor(0.3, dtype=torch.float32)).bfloat16()
    got = load_folder(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_same_tensors(got, expected)


def test_ties_over_slices_takes_each_models_own_layers_and_the_base_listed(deep, tmp_path):
    # the base's layers 0-1 with the experts' layers 2-3 and 0-1, then all of layers 2-3
    e0, e1 = deep["expert_0"], deep["expert_1"]
    config = {
        "merge_method": "ties",
        "base_model": deep["base"],
        "parameters": {"density": 0.5},
        "slices": [
            {
                "sources": [
                    {"model": deep["base"], "layer_range": [0, 2]},
                    {"model": e0, "layer_range": [2, 4]},
                    {"model": e1, "layer_range": [0, 2]},
                ]
            },
            {"sources": [{"model": m, "layer_range": [2, 4]} for m in (e0, e1)]},  # base: same layers
        ],
    }
    merge(parse_config(config), str(tmp_path / "out"))
    base, a, b = (load_folder(deep[k]) for k in ("base", "expert_0", "expert_1"))
    base_in = stacked([(base, 0), (base, 1), (base, 2), (base, 3)], base, base)
    a_in = stacked([(a, 2), (a, 3), (a, 2), (a, 3)], a, a)
    b_in = stacked([(b, 0), (b, 1), (b, 2), (b, 3)], b, b)
    expected = reference_merge("ties", base_in, [a_in, b_in], density=0.5)
    got = load_folder(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-7, msg=name)


def test_a_slice_may_give_its_own_base_for_its_layers(deep, tmp_path):
    # mergekit's per-slice base_model: slice 1 merges onto expert_1, listed with its layers;
    # slice 2 onto expert_0, not listed, so its same layers. The embeddings take the first
    # slice's base, the final norm and head the last slice's.
    base, e0, e1 = deep["base"], deep["expert_0"], deep["expert_1"]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": m, "layer_range": [0, 2]} for m in (base, e0, e1)]},
            {
                "base_model": e1,
                "sources": [{"model": m, "layer_range": [2, 3]} for m in (e0, e1, base)],
            },
            {"base_model": e0, "sources": [{"model": e1, "layer_range": [3, 4]}]},
        ],
    }
    result = merge(parse_config(config), str(tmp_path / "out"))
    b, a, c = (load_folder(deep[k]) for k in ("base", "expert_0", "expert_1"))
    first = reference_merge("task_arithmetic", b, [a, c])
    second = reference_merge("task_arithmetic", c, [a, b])
    third = reference_merge("task_arithmetic", a, [c])
    expected = stacked([(first, 0), (first, 1), (second, 2), (third, 3)], first=first, last=third)
    got = load_folder(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-7, msg=name)
    # lineage: every model read; the global base as the base
    assert result.manifest["inputs"]["base"]["ref"] == base
    assert [m["ref"] for m in result.manifest["inputs"]["models"]] == [e0, e1, base]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| 3 | `{e1}` layer 3; base `{e0}` |" in card
    assert f"| `{e0}` | model |" in card and f"| `{base}` | base |" in card


def test_a_slice_of_its_own_base_refuses_task_vectors_of_the_global_one(deep, tmp_path):
    vector = ensure_task_vector(deep["base"], deep["expert_0"], str(tmp_path / "store")).uri
    config = {
        "merge_method": "task_arithmetic",
        "base_model": deep["base"],
        "slices": [
            {
                "base_model": deep["expert_1"],
                "sources": [{"model": m, "layer_range": [0, 4]} for m in (vector, deep["expert_1"])],
            }
        ],
    }
    assert refusal(config, tmp_path) == (
        f"slices[0].sources[0]: '{vector}' is a task vector of base_model, but slices[0].base_model "
        "gives this slice another base; merge the expert itself"
    )


def test_a_gradient_runs_over_each_slice_on_its_own(deep, tmp_path):
    # mergekit's position t restarts in each slice: with two layers a slice has t = 0 and 1
    e0, e1 = deep["expert_0"], deep["expert_1"]
    rising = {"parameters": {"weight": [1.0, 3.0]}}
    config = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": e0, "layer_range": [0, 2]} | rising,
                    {"model": e1, "layer_range": [2, 4]},
                ]
            },
            {
                "sources": [
                    {"model": e0, "layer_range": [2, 4]} | rising,
                    {"model": e1, "layer_range": [0, 2]},
                ]
            },
        ],
    }
    merge(parse_config(config), str(tmp_path / "out"))
    a, b = load_folder(e0), load_folder(e1)
    got = load_folder(tmp_path / "out")
    for k, (la, lb) in enumerate([(0, 2), (1, 3), (2, 0), (3, 1)]):
        weight = 1.0 if k % 2 == 0 else 3.0
        for name in (n for n in a if layer_of(n) == la):
            other = b[LAYER.sub(f".layers.{lb}.", name)]
            expected = (weight * a[name] + other) / (weight + 1)
            torch.testing.assert_close(got[LAYER.sub(f".layers.{k}.", name)], expected, rtol=0, atol=1e-7)
    # outside the layers t = 0: weight 1 for both
    for name in (n for n in a if layer_of(n) is None):
        torch.testing.assert_close(got[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-7)


def test_layer_ranges_past_the_last_layer_are_refused_naming_the_source(deep, tmp_path):
    config = {
        "merge_method": "passthrough",
        "slices": slices((deep["expert_0"], 0, 2), (deep["expert_1"], 2, 5)),
    }
    assert refusal(config, tmp_path) == (
        f"slices[1].sources[0]: layer_range [2, 5] reaches past the last layer of '{deep['expert_1']}', "
        "which has 4 layers (0 to 3)"
    )


def test_a_layer_without_a_tensor_the_others_have_is_refused(deep, tmp_path):
    odd = edited_copy(
        deep["expert_1"], tmp_path / "odd", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")
    )
    sources = [{"model": m, "layer_range": [0, 2]} for m in (deep["expert_0"], str(odd))]
    config = {"merge_method": "linear", "slices": [{"sources": sources}]}
    assert refusal(config, tmp_path, IncompatibleModelsError) == (
        f"slices[0].sources[1] ('{odd}'): layer 1 lacks 'mlp.up_proj.weight', which layer 1 of "
        f"slices[0].sources[0] ('{deep['expert_0']}') has"
    )


def test_a_model_with_two_stacks_of_layers_is_refused(deep, tmp_path):
    # a vision tower's layers beside the decoder's: mergekit asks for its `modules:` syntax
    two = edited_copy(
        deep["expert_0"], tmp_path / "two-stacks", lambda t: t.update({"vision.layers.0.w": torch.ones(2)})
    )
    config = {"merge_method": "passthrough", "slices": slices((str(two), 0, 2), (deep["expert_1"], 2, 4))}
    assert refusal(config, tmp_path) == (
        f"slices[0].sources[0] ('{two}'): its layers are numbered under more than one name "
        "('model.layers.', 'vision.layers.'); mergeflow slices models with one stack of layers"
    )


def test_a_base_listed_with_layers_it_lacks_is_refused_naming_where_it_is_listed(deep, tmp_path):
    sources = [
        {"model": deep["expert_0"], "layer_range": [0, 2]},
        {"model": deep["base"], "layer_range": [3, 5]},
    ]
    config = {"merge_method": "task_arithmetic", "base_model": deep["base"], "slices": [{"sources": sources}]}
    assert refusal(config, tmp_path) == (
        f"slices[0].sources[1]: layer_range [3, 5] reaches past the last layer of '{deep['base']}', "
        "which has 4 layers (0 to 3)"
    )


def test_a_model_whose_layers_are_named_in_no_known_way_is_refused(deep, tmp_path):
    # mergeflow knows layers.<i>, h.<i>, layer.<i> and block(s).<i> (tests/test_layer_names.py)
    def rename(tensors):
        for name in [n for n in tensors if ".layers." in n]:
            tensors[name.replace(".layers.", ".stage.")] = tensors.pop(name)

    other = edited_copy(deep["expert_0"], tmp_path / "stage-named", rename)
    config = {"merge_method": "passthrough", "slices": slices((str(other), 0, 1))}
    assert refusal(config, tmp_path) == (
        f"slices[0].sources[0] ('{other}'): none of its tensor names numbers a layer ('layers.<i>.', "
        "'h.<i>.', 'layer.<i>.', 'block.<i>.'), so mergeflow cannot tell its layers apart to slice them"
    )


def test_layers_of_other_shapes_are_refused_naming_both_sources(deep, tmp_path):
    def shrink(tensors):
        tensors["model.layers.3.mlp.up_proj.weight"] = torch.zeros(64, 64)

    odd = edited_copy(deep["expert_1"], tmp_path / "odd", shrink)
    sources = [{"model": deep["expert_0"], "layer_range": [0, 2]}, {"model": str(odd), "layer_range": [2, 4]}]
    config = {"merge_method": "linear", "slices": [{"sources": sources}]}
    assert refusal(config, tmp_path, IncompatibleModelsError) == (
        f"tensor 'model.layers.1.mlp.up_proj.weight': shape [64, 64] in '{odd}' (its "
        f"'model.layers.3.mlp.up_proj.weight') but [128, 64] in '{deep['expert_0']}'"
    )
