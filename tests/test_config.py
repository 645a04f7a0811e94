"""mergekit YAML, as users write it, parses and resolves per tensor by mergekit's rules."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import but_the_model_card

from mergeflow.config import load_config, parse_config
from mergeflow.errors import ConfigError
from mergeflow.layer_names import is_input_embedding, layer_position, layer_stacks, split_layer
from mergeflow.parameters import evaluate_setting, resolve_parameters
from mergeflow.safetensors_io import BFLOAT16

MERGEKIT_TIES = """\
models:
  - model: ./base-7b
    # no parameters necessary for base model
  - model: ./math-expert
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: ./code-expert
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: ./chat-expert
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ./base-7b
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def parameters_of(config, tensor_name: str, layers: int) -> dict:
    """The parameters of a tensor of a whole-model merge of Llama-like models with `layers` layers."""
    [group] = config.groups()
    return resolve_parameters(
        config, group, tensor_name, layer_position(tensor_name, {"model.layers.": layers})
    )


def test_mergekit_ties_yaml_parses_as_is(tmp_path):
    path = tmp_path / "ties.yaml"
    path.write_text(MERGEKIT_TIES)
    config = load_config(path)
    assert config.method.name == "ties"
    assert [m.model for m in config.experts()] == ["./math-expert", "./code-expert", "./chat-expert"]
    assert config.output_dtype() == BFLOAT16


def test_dtypes_may_be_spelled_as_torch_names_as_mergekit_reads_them():
    config = parse_config(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}],
            "dtype": "torch.bfloat16",
            "out_dtype": "torch.float16",
        }
    )
    assert (config.dtype, config.out_dtype) == ("bfloat16", "float16")


def test_keys_written_without_a_value_are_empty_as_mergekit_reads_them(tmp_path):
    # as in mergekit's own examples/ties.yml: "parameters:" with nothing under it
    path = tmp_path / "task_arithmetic.yaml"
    path.write_text(
        "models:\n  - model: ./math-expert\n    parameters:\n  - model: ./code-expert\n"
        "merge_method: task_arithmetic\nbase_model: ./base-7b\nparameters:\nslices:\ndtype: bfloat16\n"
    )
    config = load_config(path)
    assert config.parameters == {} and config.slices == []
    assert [(m.model, m.parameters) for m in config.experts()] == [
        ("./math-expert", {}),
        ("./code-expert", {}),
    ]
    assert parameters_of(config, "model.layers.0.mlp.up_proj.weight", layers=2)["lambda"] == 1.0


def test_parameters_resolve_per_tensor_like_mergekit(tmp_path):
    path = tmp_path / "ties.yaml"
    path.write_text(MERGEKIT_TIES)
    config = load_config(path)
    first = parameters_of(config, "model.layers.0.mlp.up_proj.weight", layers=5)
    middle = parameters_of(config, "model.layers.2.self_attn.q_proj.weight", layers=5)
    last = parameters_of(config, "model.layers.4.mlp.up_proj.weight", layers=5)
    embed = parameters_of(config, "model.embed_tokens.weight", layers=5)
    np.testing.assert_allclose(first["density"], [1.0, 0.5, 0.33], rtol=1e-6)
    np.testing.assert_allclose(middle["density"], [0.7, 0.5, 0.33], rtol=1e-6)
    np.testing.assert_allclose(last["density"], [0.1, 0.5, 0.33], rtol=1e-6)
    # weight gradient over 4 points at t = 0.5 sits halfway between 0.3 and 0.7
    np.testing.assert_allclose(middle["weight"], [1.0, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(first["weight"], [1.0, 0.0, 0.5], rtol=1e-6)  # filter: mlp
    np.testing.assert_allclose(last["weight"], [1.0, 1.0, 0.5], rtol=1e-6)
    assert embed["density"][0] == 1.0  # tensors outside layers sit at t = 0
    assert first["normalize"] is True and first["lambda"] == 1.0 and first["int8_mask"] is True


def test_model_parameters_override_global_ones():

    config = parse_config(
        {
            "merge_method": "dare_ties",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"density": 0.9}}, {"model": "y"}],
            "parameters": {"density": 0.2, "seed": 4},
        }
    )
    resolved = parameters_of(config, "w", layers=1)
    np.testing.assert_allclose(resolved["density"], [0.9, 0.2], rtol=1e-6)
    assert resolved["seed"] == 4 and resolved["rescale"] is True and resolved["normalize"] is False


@pytest.mark.parametrize(
    ("name", "layers", "expected"),
    [
        ("model.layers.0.mlp.w", 4, 0.0),
        ("model.layers.3.mlp.w", 4, 1.0),
        ("model.layers.1.x", 3, 0.5),
        ("model.norm.weight", 4, 0.0),
        ("model.layers.0.x", 1, 1.0),
    ],
)
def test_layer_position(name, layers, expected):
    assert layer_position(name, {"model.layers.": layers}) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.mlp.up_proj.weight", ("model.layers.", 3, "mlp.up_proj.weight")),
        ("gpt_neox.layers.2.attention.dense.bias", ("gpt_neox.layers.", 2, "attention.dense.bias")),
        (
            "transformer.h.11.attn.c_attn.weight",
            ("transformer.h.", 11, "attn.c_attn.weight"),
        ),  # GPT-2, Falcon
        ("bert.encoder.layer.5.output.dense.weight", ("bert.encoder.layer.", 5, "output.dense.weight")),
        (
            "encoder.block.0.layer.1.DenseReluDense.wi.weight",
            ("encoder.block.", 0, "layer.1.DenseReluDense.wi.weight"),
        ),
        ("visual.blocks.7.attn.qkv.weight", ("visual.blocks.", 7, "attn.qkv.weight")),
        ("layers.4.attention.wq.weight", ("layers.", 4, "attention.wq.weight")),
        (
            "model.layers.0.block_sparse_moe.experts.3.w1.weight",
            ("model.layers.", 0, "block_sparse_moe.experts.3.w1.weight"),
        ),
        ("transformer.wte.weight", None),
        ("model.embed_tokens.weight", None),
        ("heads.0.weight", None),
    ],
)
def test_layer_numbers_are_found_under_the_names_architectures_give_them(name, expected):
    assert split_layer(name) == expected


def test_each_stack_of_layers_runs_its_gradient_over_its_own_layers():
    # a vision tower of 4 blocks beside a decoder of 3 layers (mergekit's modules)
    names = [f"visual.blocks.{i}.attn.weight" for i in range(4)] + [
        f"model.layers.{i}.mlp.weight" for i in range(3)
    ]
    stacks = layer_stacks(names, {"num_hidden_layers": 3})
    assert stacks == {"visual.blocks.": 4, "model.layers.": 3}
    assert layer_position("visual.blocks.1.attn.weight", stacks) == pytest.approx(1 / 3)
    assert layer_position("model.layers.1.mlp.weight", stacks) == 0.5
    # one stack takes config.json's count, under the name the architecture gives it
    assert layer_stacks([f"transformer.h.{i}.mlp.c_fc.weight" for i in range(3)], {"n_layer": 5}) == {
        "transformer.h.": 5
    }
    assert layer_stacks(["lm_head.weight"], {"num_hidden_layers": 2}) == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.embed_tokens.weight", True),
        ("transformer.wte.weight", True),
        ("transformer.wpe.weight", True),
        ("transformer.word_embeddings.weight", True),
        ("gpt_neox.embed_in.weight", True),
        ("embed_out.weight", False),
        ("lm_head.weight", False),
        ("transformer.ln_f.weight", False),
        ("model.norm.weight", False),
    ],
)
def test_input_embeddings_are_told_from_the_head_and_final_norm(name, expected):
    assert is_input_embedding(name) is expected


def test_mergekits_per_module_configs_are_refused_saying_what_merges_instead():
    raw = {
        "merge_method": "linear",
        "modules": {"text_decoder": {"models": [{"model": "a"}, {"model": "b"}]}},
    }
    with pytest.raises(
        ConfigError, match=r"^config: modules: mergekit's per-module configs are not supported; `models:`"
    ):
        parse_config(raw)


def test_conditional_without_a_match_falls_through_to_the_default():
    from mergeflow.parameters import ConditionalParameter

    assert evaluate_setting([ConditionalParameter(filter="mlp", value=2.0)], "attn.q", 0.0) is None


def test_linear_is_an_alias_of_average():

    config = parse_config({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]})
    assert config.method.name == "average" and len(config.experts()) == 2


def test_linear_averages_a_base_model_exactly_when_it_is_listed():

    two = [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}]
    # base_model alone is where task-vector inputs are added (mergekit would refuse: no weight)
    config = parse_config({"merge_method": "linear", "base_model": "base", "models": two})
    assert [e.model for e in config.experts()] == ["a", "b"]
    # listed with a global weight, it is averaged, as mergekit averages it
    listed = [{"model": "base"}, {"model": "a"}, {"model": "b"}]
    config = parse_config(
        {"merge_method": "linear", "base_model": "base", "models": listed, "parameters": {"weight": 1}}
    )
    assert [e.model for e in config.experts()] == ["base", "a", "b"]


MERGEKIT_SLERP = """\
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: bfloat16
"""


def test_mergekit_slerp_yaml_with_a_whole_model_slice_parses_as_is(tmp_path):
    path = tmp_path / "slerp.yaml"
    path.write_text(MERGEKIT_SLERP)
    config = load_config(path)
    assert [m.model for m in config.experts()] == ["mlabonne/NeuralHermes-2.5-Mistral-7B"]
    [group] = config.groups()
    assert (group.field, group.positions, group.layer_ranges, group.base_range) == (
        "slices[0].sources",
        [1],
        [(0, 32)],
        (0, 32),
    )
    assert parameters_of(config, "model.layers.8.self_attn.q_proj.weight", layers=33)["t"] == 0.5
    assert parameters_of(config, "model.layers.0.mlp.up_proj.weight", layers=33)["t"] == 1.0
    assert parameters_of(config, "model.norm.weight", layers=33)["t"] == 0.5


def slerp_config(zoo: dict[str, str], layers: tuple[int, int] | None = None) -> dict:
    config = {"merge_method": "slerp", "base_model": zoo["base"], "parameters": {"t": [0.2, 0.9]}}
    models = [zoo["base"], zoo["expert_0"]]
    if layers is None:
        return config | {"models": [{"model": m} for m in models]}
    return config | {"slices": [{"sources": [{"model": m, "layer_range": list(layers)} for m in models]}]}


def test_a_whole_model_slice_merges_as_the_models_list_does(zoo, tmp_path):
    from mergeflow.checkpoint import open_checkpoint
    from mergeflow.engine import merge

    base = open_checkpoint(zoo["base"])
    [layers] = layer_stacks(base.tensors, base.config).values()
    listed = merge(parse_config(slerp_config(zoo)), str(tmp_path / "listed"))
    sliced = merge(parse_config(slerp_config(zoo, (0, layers))), str(tmp_path / "sliced"))
    assert but_the_model_card(sliced.manifest) == but_the_model_card(listed.manifest)


def test_mergekits_long_form_of_a_model_reference_reads_as_its_short_form():

    def path(name, revision=None):
        return {"path": name} | ({"revision": revision} if revision else {})

    long = {
        "merge_method": "ties",
        "base_model": {"model": path("org/base", "v1")},
        "models": [
            {"model": {"model": path("/data/my models/x"), "lora": path("org/lora", "abc")}},
            {"model": {"model": "y@v2"}},
        ],
        "parameters": {"density": 0.5},
        "tokenizer": {"source": {"model": path("org/tok")}},
    }
    short = long | {
        "base_model": "org/base@v1",
        "models": [{"model": "/data/my models/x+org/lora@abc"}, {"model": "y@v2"}],
        "tokenizer": {"source": "org/tok"},
    }
    assert parse_config(long) == parse_config(short)
    sliced = {"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.5}}
    sources = [{"model": {"model": path(name)}, "layer_range": [0, 2]} for name in ("b", "c")]
    sliced["slices"] = [{"sources": sources}]
    assert [s.model for s in parse_config(sliced).slices[0].sources] == ["b", "c"]


def test_a_slices_parameters_sit_between_its_sources_and_the_global_ones():

    def source(model, start, **parameters):
        return {"model": model, "layer_range": [start, start + 2], "parameters": parameters}

    config = parse_config(
        {
            "merge_method": "ties",
            "base_model": "base",
            "parameters": {"density": 0.5, "lambda": 0.8},
            "slices": [
                {"sources": [source("base", 0), source("a", 0), source("b", 2)]},
                {
                    "sources": [source("base", 2), source("a", 2, density=0.9), source("b", 0)],
                    "parameters": {"density": 0.3, "lambda": 1.5},
                },
            ],
        }
    )
    first, second = config.groups()
    name = "model.layers.3.mlp.up_proj.weight"
    assert resolve_parameters(config, first, name, 1.0)["density"].tolist() == [0.5, 0.5]
    assert resolve_parameters(config, first, name, 1.0)["lambda"] == 0.8
    assert resolve_parameters(config, second, name, 1.0)["density"].tolist() == pytest.approx([0.9, 0.3])
    assert resolve_parameters(config, second, name, 1.0)["lambda"] == 1.5
    assert [e.model for e in config.experts()] == ["a", "b"]


def test_a_required_parameter_may_be_given_by_every_slice_instead():

    def slice_(t=None):
        sources = [{"model": m, "layer_range": [0, 2]} for m in ("base", "a")]
        return {"sources": sources} | ({"parameters": {"t": t}} if t is not None else {})

    config = {"merge_method": "slerp", "base_model": "base"}
    parse_config(config | {"slices": [slice_(0.2), slice_([0.1, 0.9])]})
    with pytest.raises(ConfigError, match="parameters.t: required by method 'slerp'"):
        parse_config(config | {"slices": [slice_(0.2), slice_()]})
    with pytest.raises(ConfigError, match=r"slices\[1\].parameters.t: must be in \[0, 1\], got nan"):
        parse_config(config | {"slices": [slice_(0.2), slice_(float("nan"))]})
