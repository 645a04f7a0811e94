"""Bad merge configs: one line naming the config file and the field, read before any model is
(except where the check needs one), and the CLI's exit status 2 without a traceback."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from mergeflow.cli import app
from mergeflow.config import parse_config
from mergeflow.errors import ConfigError
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, str]:
    return build_generated_zoo(
        tmp_path_factory.mktemp("bad-configs"), GeneratedZooSpec(num_experts=2, seed=9)
    )


def ties(small, second: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": small["base"],
        "models": [{"model": small["expert_0"]}, {"model": str(second)}],
        "parameters": {"density": 0.5},
    }


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"merge_method": "frankenmerge"}, "unknown method 'frankenmerge'"),
        ({"parameters": {"density": 0.0}}, "density: must be in (0, 1]"),
        ({"parameters": {"density": 1.5}}, "density: must be in (0, 1]"),
        ({"parameters": {"lambda": float("nan")}}, "lambda: must be a finite number"),
        ({"parameters": {"lambda": float("inf")}}, "lambda: must be a finite number"),
        ({"parameters": {"weight": "heavy"}}, "weight: must be a number"),
        ({"parameters": {"normalize": 3}}, "normalize: must be true or false"),
        ({"parameters": {"t": 0.5}}, "parameters.t: unknown parameter for method 'ties'"),
        ({"models": []}, "zero experts"),
        ({"base_model": None}, "needs a base model"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"models": {"model": "m"}}, "models: expected a list, got a mapping ({'model': 'm'})"),
        (  # pydantic named its class here
            {"models": ["m"]},
            "models.0: expected a mapping such as {model: PATH}, got a string ('m')",
        ),
        (
            {"tokenizer": "union"},
            "tokenizer: expected a mapping, got a string ('union'); "
            "a source alone is tokenizer_source: union",
        ),
        (  # mergekit refuses it too; mergeflow merged it twice
            {"models": [{"model": "m"}, {"model": "n"}, {"model": "m"}]},
            "models[2]: 'm' is listed already, as models[0]; give it a weight to count it more",
        ),
        (  # of the base listed twice, mergeflow had taken the first and dropped the second
            {
                "models": [],
                "slices": [
                    {
                        "sources": [
                            {"model": "b", "layer_range": [0, 1]},
                            {"model": "b", "layer_range": [1, 2]},
                            {"model": "m", "layer_range": [0, 1]},
                        ]
                    }
                ],
            },
            "slices[0].sources[1]: 'b' is listed already, as slices[0].sources[0]; "
            "a slice merges one layer range of each model",
        ),
        (  # an old mergekit example's spelling, which mergekit ignores: mergeflow names it
            {"parameters": {"density": [{"pattern": "mlp", "value": 0.5}, {"value": 0.3}]}},
            "unknown key 'parameters.density.0.pattern' (supported: value, filter)",
        ),
        ({"slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}, "not both"),
        (
            {"models": [], "slices": [{"sources": [{"model": "m", "layer_range": [2, 2]}]}]},
            "slices.0.sources.0: layer_range [2, 2] holds no layers: give [start, end) with 0 <= start < end",
        ),
        (
            {"models": [], "slices": [{"sources": []}]},
            "slices.0: sources: a slice needs at least one source",
        ),
        (
            {
                "models": [],
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 1]},
                            {"model": "b", "layer_range": [0, 2]},
                        ]
                    }
                ],
            },
            "slices.0: the sources' layer ranges ([0, 1], [0, 2]) differ in length; "
            "a slice merges layer for layer",
        ),
        (  # which of the base's layers go with them?
            {
                "models": [],
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 1]},
                            {"model": "b", "layer_range": [1, 2]},
                        ]
                    }
                ],
            },
            "slices[0].sources: base_model '{base}' is not among them and they take different layers; "
            "list the base with the layer_range to merge them into",
        ),
        (  # a slice's own base: the same rule
            {
                "models": [],
                "slices": [
                    {
                        "base_model": "c",
                        "sources": [
                            {"model": "a", "layer_range": [0, 1]},
                            {"model": "b", "layer_range": [1, 2]},
                        ],
                    }
                ],
            },
            "slices[0].sources: slices[0].base_model 'c' is not among them and they take different "
            "layers; list the base with the layer_range to merge them into",
        ),
        (  # without base_model, each slice needs a base of its own
            {
                "base_model": None,
                "models": [],
                "slices": [
                    {"base_model": "a", "sources": [{"model": "b", "layer_range": [0, 1]}]},
                    {"sources": [{"model": "b", "layer_range": [1, 2]}]},
                ],
            },
            "slices[1]: method 'ties' needs a base model (give base_model, or the slice its own)",
        ),
        (
            {
                "merge_method": "passthrough",
                "models": [],
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}]},
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 1]},
                            {"model": "b", "layer_range": [1, 2]},
                        ]
                    },
                ],
            },
            "slices[1].sources: method 'passthrough' merges exactly 1 model(s) besides the base, got 2",
        ),
        (
            {"models": [], "slices": [{"sources": [{"model": "m", "layer_range": [0, 1], "weight": 1}]}]},
            "unknown key 'slices.0.sources.0.weight' (supported: model, layer_range, parameters)",
        ),
        (  # unused by mergekit 0.1.5 itself
            {
                "models": [],
                "slices": [{"residual_weight": 0.5, "sources": [{"model": "m", "layer_range": [0, 1]}]}],
            },
            "slices.0: residual_weight: mergekit reads it but never applies it, so it would change "
            "nothing; leave it out",
        ),
        ({"models": [], "slices": [{"sources": [{"model": "m"}]}]}, "sources.0.layer_range: required"),
        (
            {"models": [], "slices": [{"sources": [{"model": "m", "layer_range": [0, 1, 2]}]}]},
            "slices.0.sources.0.layer_range: give [start, end), two whole numbers, got a list ([0, 1, 2])",
        ),
        (
            {"tokenizer": {"source": "base", "tokens": {"<|im_end|>": {"source": "elsewhere"}}}},
            "tokenizer.tokens.<|im_end|>.source: model 'elsewhere' is not one of the merged models",
        ),
        (
            {
                "tokenizer": {
                    "tokens": {
                        "x": {"source": {"kind": "model_token", "model": "m", "token": "a", "token_id": 1}}
                    }
                }
            },
            "a model_token source gives token_id or token (one of them)",
        ),
        (
            {"tokenizer": {"tokens": {"x": {"source": {"kind": "mean"}}}}},
            "tokenizer.tokens.x.source: a token source is a model, {kind: model_token, model, token or",
        ),
        (
            {"tokenizer": {"tokens": {"x": {"source": {"kind": "zero", "model": "m"}}}}},
            "unknown key 'tokenizer.tokens.x.source.model' (supported: kind)",
        ),
        (
            {"tokenizer": {"source": "base"}, "tokenizer_source": "base"},
            "tokenizer_source or the tokenizer block",
        ),
        ({"tokenizer": {"source": "base", "pad_to_multiple_of": 0}}, "must be a positive integer, got 0"),
        (
            {"tokenizer": {"source": "base", "padding": 8}},
            "unknown key 'tokenizer.padding' (supported: source, tokens, pad_to_multiple_of)",
        ),
        ({"merge_method": "della", "parameters": {"epsilon": 1.0}}, "parameters.epsilon: must be in [0, 1)"),
        ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: unknown parameter for method 'ties'"),
        (
            {"merge_method": "sce", "parameters": {"select_topk": 0}},
            "parameters.select_topk: must be in (0, 1]",
        ),
        (
            {"merge_method": "sce", "parameters": {"density": 0.5}},
            "parameters.density: unknown parameter for method 'sce' (supported here: select_topk, int8_mask)",
        ),
        (
            {
                "merge_method": "sce",
                "models": [{"model": "m", "parameters": {"select_topk": 0.5}}],
                "parameters": {},
            },
            "models[0].parameters.select_topk: method 'sce' takes one select_topk for all models; "
            "set it under the top-level parameters",
        ),
        (
            {"merge_method": "linear", "parameters": {"weight": 1.0}},
            "parameters.weight: with a global weight, mergekit averages base_model too",
        ),
        (
            {"merge_method": "dare_ties", "parameters": {"seed": [1, 5]}},
            "parameters.seed: must be an integer, so it cannot be a gradient over layers",
        ),
        ({"dtype": "float8"}, "dtype"),
        (  # mergekit's long form of a model reference
            {"base_model": {"model": {"path": 3}}},
            "base_model: a model path is a string or a mapping of path and revision (got {'path': 3})",
        ),
        (
            {"base_model": {"model": "b", "override_architecture": "MistralForCausalLM"}},
            "base_model: override_architecture is not supported: mergeflow keeps the models' architecture",
        ),
        (
            {"base_model": {"path": "b"}},
            "base_model: a model given as a mapping has keys model and lora (got ['path'])",
        ),
        (
            {"chat_template": "vicuna"},
            "chat_template: 'vicuna' is neither a Jinja template nor one of "
            "auto, chatml, llama3, alpaca, mistral, exaone",
        ),
    ],
)
def test_config_errors_name_the_field(small, change, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config(ties(small, small["expert_1"]) | change, source="merge.yaml")
    assert fragment.replace("{base}", small["base"]) in str(caught.value) and str(caught.value).startswith(
        "merge.yaml: "
    )


def test_slerp_merges_exactly_one_model_and_model_stock_at_least_two(small):
    two = [{"model": small["expert_0"]}, {"model": small["expert_1"]}]
    base = {"base_model": small["base"]}
    with pytest.raises(ConfigError, match="exactly 1"):
        parse_config({"merge_method": "slerp", "models": two, "parameters": {"t": 0.5}} | base)
    with pytest.raises(ConfigError, match="at least 2"):
        parse_config({"merge_method": "model_stock", "models": two[:1]} | base)


def test_cli_prints_one_line_and_exits_2(small, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(ties(small, tmp_path / "missing-expert")))
    result = CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing-expert" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_names_the_config_file_in_refusals_that_need_the_models(small, tmp_path):
    path = tmp_path / "padded.yaml"
    config = ties(small, small["expert_1"]) | {"tokenizer": {"source": "base", "pad_to_multiple_of": 7}}
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {path}: tokenizer source 'base': model '{small['base']}' has no tokenizer files "
        "(tokenizer.json, tokenizer.model, vocab.json, merges.txt, added_tokens.json, tokenizer_config.json)"
    )
    assert not (tmp_path / "o").exists()


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("merge_method: [unclosed")
    result = CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {path}: not valid YAML: line 1, column 24: expected ',' or ']', but got '<stream end>'"
    )
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "absent.yaml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "absent.yaml" in result.output
