"""Models whose layers are not Llama's `model.layers.<i>.`: GPT-2's `transformer.h.<i>.` (also
GPT-BigCode/StarCoder, Falcon, Qwen 1) and models with two stacks of layers. Gradients run over
their layers and slices take them, as mergekit's architecture tables have it. Outputs are
checked against state dicts computed here by hand, and load with transformers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_folder
from safetensors.torch import load_file, save_file

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import IncompatibleModelsError

GPT2_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict[str, str]:
    """A 4-layer GPT-2 base and 2 experts with seeded random weights (tied heads, as GPT-2's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=64, n_positions=16)
    models = {}
    for seed, name in enumerate(("base", "expert_0", "expert_1")):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():  # GPT-2 starts its biases and norms alike in every model
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        model.save_pretrained(root / name)
        models[name] = str(root / name)
    return models


def layer_of(name: str) -> int | None:
    match = GPT2_LAYER.match(name)
    return int(match.group(1)) if match else None


def test_a_gradient_runs_over_gpt2_layers(gpt2, tmp_path):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": gpt2["base"],
        "models": [{"model": gpt2["expert_0"], "parameters": {"weight": [1.0, 4.0]}}],
        "dtype": "float32",
    }
    merge(parse_config(config), str(tmp_path / "out"))
    got, base, expert = (load_folder(p) for p in (tmp_path / "out", gpt2["base"], gpt2["expert_0"]))
    assert sorted(got) == sorted(base)
    for name, tensor in base.items():
        layer = layer_of(name)
        # layer i of 4 sits at t = i/3 on the gradient; tensors outside the layers at t = 0
        weight = 1.0 if layer is None else 1.0 + 3.0 * layer / 3
        torch.testing.assert_close(got[name], tensor + weight * (expert[name] - tensor), rtol=0, atol=1e-6)
    assert any(not torch.equal(got[n], base[n] + expert[n] - base[n]) for n in got if layer_of(n) == 3)


def test_slices_of_gpt2_stack_its_layers_and_load_with_transformers(gpt2, tmp_path):
    from transformers import GPT2LMHeadModel

    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": gpt2["expert_0"], "layer_range": [0, 2]}]},
            {"sources": [{"model": gpt2["expert_1"], "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    merge(parse_config(config), str(tmp_path / "out"))
    got, first, last = (load_folder(p) for p in (tmp_path / "out", gpt2["expert_0"], gpt2["expert_1"]))
    parts = [(first, 0), (first, 1), (last, 1), (last, 2), (last, 3)]
    expected = {n: t for n, t in first.items() if n.startswith(("transformer.wte.", "transformer.wpe."))}
    expected |= {n: t for n, t in last.items() if n.startswith("transformer.ln_f.")}
    for k, (state, layer) in enumerate(parts):
        prefix = f"transformer.h.{layer}."
        expected |= {
            f"transformer.h.{k}.{n[len(prefix) :]}": t for n, t in state.items() if n.startswith(prefix)
        }
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == 5
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    assert model.config.n_layer == 5
    assert torch.equal(model.transformer.h[4].mlp.c_fc.weight, last["transformer.h.3.mlp.c_fc.weight"])


def two_stack_model(folder: Path, seed: int) -> str:
    """A model with a 4-block vision tower beside a 3-layer decoder (as vision-language models)."""
    torch.manual_seed(seed)
    tensors = {f"visual.blocks.{i}.attn.weight": torch.randn(4, 4) for i in range(4)}
    tensors |= {f"model.layers.{i}.mlp.weight": torch.randn(4, 4) for i in range(3)}
    tensors["model.embed_tokens.weight"] = torch.randn(8, 4)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    config = {"architectures": ["TwoStackForTest"], "num_hidden_layers": 3, "vocab_size": 8}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_each_stack_of_layers_runs_the_gradient_over_its_own_layers(tmp_path):
    a, b = two_stack_model(tmp_path / "a", 0), two_stack_model(tmp_path / "b", 1)
    config = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": [1.0, 0.0]}},
            {"model": b, "parameters": {"weight": [0.0, 1.0]}},
        ],
        "dtype": "float32",
    }
    merge(parse_config(config), str(tmp_path / "out"))
    got, first, second = (load_folder(p) for p in (tmp_path / "out", a, b))
    # t = i/3 on the tower's 4 blocks, i/2 on the decoder's 3 layers, 0 outside the layers
    positions = {f"visual.blocks.{i}.attn.weight": i / 3 for i in range(4)}
    positions |= {f"model.layers.{i}.mlp.weight": i / 2 for i in range(3)}
    positions["model.embed_tokens.weight"] = 0.0
    for name, t in positions.items():
        torch.testing.assert_close(got[name], (1 - t) * first[name] + t * second[name], rtol=0, atol=1e-6)


def bare_copy(model: str, target: Path) -> str:
    """`model` as transformers saves the bare GPT2Model (the hub's `gpt2`): no `transformer.`."""
    shutil.copytree(model, target)
    tensors = load_file(target / "model.safetensors")
    save_file(
        {name.removeprefix("transformer."): t for name, t in tensors.items()}, target / "model.safetensors"
    )
    return str(target)


def test_models_saved_without_the_architecture_prefix_merge_under_the_bases_names(gpt2, tmp_path):
    from transformers import GPT2LMHeadModel

    def ties(base: str, experts: list[str]) -> dict:
        models = [{"model": e} for e in experts]
        return {"merge_method": "ties", "base_model": base, "models": models, "parameters": {"density": 0.5}}

    bare_base = bare_copy(gpt2["base"], tmp_path / "bare-base")
    bare_expert = bare_copy(gpt2["expert_1"], tmp_path / "bare-expert")
    merge(parse_config(ties(gpt2["base"], [gpt2["expert_0"], gpt2["expert_1"]])), str(tmp_path / "named"))
    expected = load_folder(tmp_path / "named")
    # a bare expert takes part under the base's names; a bare base names the output
    merge(parse_config(ties(gpt2["base"], [gpt2["expert_0"], bare_expert])), str(tmp_path / "expert"))
    merge(parse_config(ties(bare_base, [gpt2["expert_0"], gpt2["expert_1"]])), str(tmp_path / "base"))
    assert load_folder(tmp_path / "expert").keys() == expected.keys()
    assert all(torch.equal(load_folder(tmp_path / "expert")[n], t) for n, t in expected.items())
    bare = load_folder(tmp_path / "base")
    assert sorted(bare) == sorted(n.removeprefix("transformer.") for n in expected)
    assert all(torch.equal(bare[n.removeprefix("transformer.")], t) for n, t in expected.items())
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")  # transformers adds the prefix back
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, expected["transformer.h.1.mlp.c_fc.weight"])


def test_names_that_differ_by_more_than_one_prefix_are_still_refused(gpt2, tmp_path):
    odd = Path(bare_copy(gpt2["expert_1"], tmp_path / "odd"))
    tensors = load_file(odd / "model.safetensors")
    tensors["decoder.wte.weight"] = tensors.pop("wte.weight")
    save_file(tensors, odd / "model.safetensors")
    config = {"merge_method": "linear", "models": [{"model": gpt2["expert_0"]}, {"model": str(odd)}]}
    with pytest.raises(IncompatibleModelsError, match="tensor names differ"):
        merge(parse_config(config), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_bare_model_in_a_later_slice_gives_its_layers_the_first_models_names(gpt2, tmp_path):
    bare = bare_copy(gpt2["expert_1"], tmp_path / "bare-expert")
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": gpt2["expert_0"], "layer_range": [0, 2]}]},
            {"sources": [{"model": bare, "layer_range": [1, 4]}]},
        ],
    }
    merge(parse_config(config), str(tmp_path / "out"))
    got, last = load_folder(tmp_path / "out"), load_folder(gpt2["expert_1"])
    assert all(name.startswith(("transformer.", "lm_head.")) for name in got)
    assert torch.equal(got["transformer.h.4.mlp.c_fc.weight"], last["transformer.h.3.mlp.c_fc.weight"])
    assert torch.equal(got["transformer.ln_f.weight"], last["transformer.ln_f.weight"])


@pytest.mark.parametrize(
    ("theirs", "ours", "expected"),
    [
        # a bare model beside its task model, either way round; the task model's head stays apart
        (
            {"transformer.h.0.w", "transformer.wte.weight", "lm_head.weight"},
            {"h.0.w", "wte.weight"},
            {"h.0.w": "transformer.h.0.w", "wte.weight": "transformer.wte.weight"},
        ),
        (
            {"h.0.w", "wte.weight"},
            {"transformer.h.0.w", "transformer.wte.weight", "lm_head.weight"},
            {"transformer.h.0.w": "h.0.w", "transformer.wte.weight": "wte.weight"},
        ),
        ({"model.a", "lm_head.weight"}, {"model.a"}, {}),  # a missing head is not a prefix
        ({"model.a", "model.b"}, {"model.a", "decoder.b"}, {}),  # another first part, not one more
        ({"transformer.a", "transformer.b"}, {"a", "c"}, {}),  # one prefix must explain every name
    ],
)
def test_a_single_first_part_added_or_left_out_is_what_renames(theirs, ours, expected):
    from mergeflow.name_prefix import _renamed

    assert _renamed(theirs, ours) == expected
