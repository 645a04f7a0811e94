"""The merged model's README.md: a model card Hugging Face tools read, naming the method, every
input with the sha256 the manifest records, and the config, the same wherever the output goes."""

from __future__ import annotations

import json
import re
import shutil

import yaml
from huggingface_hub import ModelCard

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.model_card import MODEL_CARD, model_card


def ties_config(zoo: dict[str, str]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": zoo["base"],
        "models": [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"], "parameters": {"weight": 0.5}}],
        "parameters": {"density": 0.5},
    }


def test_the_model_card_names_method_inputs_and_config(zoo, tmp_path):
    config = parse_config(ties_config(zoo))
    result = merge(config, str(tmp_path / "a"))
    card = ModelCard.load(tmp_path / "a" / MODEL_CARD)
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["mergeflow", "merge", "ties"]
    assert card.data.base_model is None  # local paths are no hub links
    inputs = result.manifest["inputs"]
    rows = dict(re.findall(r"^\| `([^`]+)` \| (?:base|model) \| `([0-9a-f]{64})` \|$", card.text, re.M))
    expected = {m["ref"]: m["sha256"] for m in [inputs["base"], *inputs["models"]]}
    assert rows == expected
    written = re.search(r"```yaml\n(.*?)```", card.text, re.S).group(1)
    assert parse_config(yaml.safe_load(written)) == config
    files = {f["path"] for f in json.loads((tmp_path / "a" / "mergeflow-manifest.json").read_text())["files"]}
    assert MODEL_CARD in files


def test_the_same_merge_writes_the_same_card_wherever_it_goes(zoo, tmp_path):
    config = parse_config(ties_config(zoo))
    for out in ("a", "elsewhere/b"):
        merge(config, str(tmp_path / out))
    assert (tmp_path / "a" / MODEL_CARD).read_bytes() == (
        tmp_path / "elsewhere" / "b" / MODEL_CARD
    ).read_bytes()


def test_a_merge_without_a_base_says_so(zoo, tmp_path):
    config = parse_config(
        {"merge_method": "linear", "models": [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}]}
    )
    merge(config, str(tmp_path / "avg"))
    text = (tmp_path / "avg" / MODEL_CARD).read_text()
    assert "A merge of 2 models with mergeflow" in text and "| base |" not in text


def test_a_path_with_a_pipe_or_backtick_keeps_the_table_whole(zoo, tmp_path):
    odd = tmp_path / "exp|ert `one`"
    shutil.copytree(zoo["expert_1"], odd)
    merge(
        parse_config(ties_config(zoo) | {"models": [{"model": zoo["expert_0"]}, {"model": str(odd)}]}),
        str(tmp_path / "out"),
    )
    rows = [
        line for line in (tmp_path / "out" / MODEL_CARD).read_text().splitlines() if line.startswith("| ")
    ]
    assert len(rows) == 4  # the header and three inputs
    assert all(len(re.split(r"(?<!\\)\|", row)) == 5 for row in rows)  # three cells each
    assert f"`` {str(odd).replace('|', chr(92) + '|')} ``" in rows[-1]


def test_a_model_only_slices_merge_onto_is_named_a_slice_base():
    sources = [{"model": m, "layer_range": [0, 2]} for m in ("b", "x")]
    config = parse_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "a",
            "slices": [
                {"sources": [{"model": m, "layer_range": [0, 2]} for m in ("a", "x")]},
                {"base_model": "b", "sources": sources},
            ],
        }
    )
    inputs = {
        "base": {"ref": "a", "sha256": "0" * 64},
        "models": [{"ref": r, "sha256": "1" * 64} for r in "xb"],
    }
    card = model_card(config, inputs)
    assert "| `x` | model |" in card and "| `b` | slice base |" in card and "| `a` | base |" in card
