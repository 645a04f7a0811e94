"""Which tokenizer a merge copies: the base's, or a model's named by `tokenizer_source` or by
mergekit's `tokenizer` block, with the block's options mergeflow can honour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

VOCAB = 256


@pytest.fixture(scope="module")
def zoo_with_tokenizers(tmp_path_factory) -> dict[str, str]:
    """Each model's tokenizer files say which model they came from."""
    zoo = build_generated_zoo(
        tmp_path_factory.mktemp("tok"), GeneratedZooSpec(num_experts=2, vocab_size=VOCAB)
    )
    for name, folder in zoo.items():
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"from": name}))
        (Path(folder) / "special_tokens_map.json").write_text(json.dumps({"eos_token": f"</{name}>"}))
    return zoo


def task_arithmetic(zoo: dict[str, str], **extra) -> dict:
    models = [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}]
    return {"merge_method": "task_arithmetic", "base_model": zoo["base"], "models": models} | extra


def merged(config: dict, out: Path) -> Path:
    merge(parse_config(config), str(out), progress=False)
    return out


def tokenizer_of(folder: Path) -> str:
    return json.loads((folder / "tokenizer_config.json").read_text())["from"]


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}


def test_the_base_tokenizer_by_default_and_by_either_spelling(zoo_with_tokenizers, tmp_path):
    zoo = zoo_with_tokenizers
    default = merged(task_arithmetic(zoo), tmp_path / "default")
    assert tokenizer_of(default) == "base"
    for name, spelling in [
        ("source", {"tokenizer_source": "base"}),
        ("block", {"tokenizer": {"source": "base"}}),
        ("padded", {"tokenizer": {"source": "base", "pad_to_multiple_of": 64}}),  # 256 is a multiple
    ]:
        out = merged(task_arithmetic(zoo, **spelling), tmp_path / name)
        assert tokenizer_of(out) == "base", name
        assert shards(out) == shards(default), name


def test_a_model_named_for_the_tokenizer_gives_its_files(zoo_with_tokenizers, tmp_path):
    zoo = zoo_with_tokenizers
    by_source = merged(task_arithmetic(zoo, tokenizer_source=zoo["expert_1"]), tmp_path / "source")
    by_block = merged(task_arithmetic(zoo, tokenizer={"source": zoo["expert_1"]}), tmp_path / "block")
    for out in (by_source, by_block):
        assert tokenizer_of(out) == "expert_1"
        assert json.loads((out / "special_tokens_map.json").read_text()) == {"eos_token": "</expert_1>"}
    assert shards(by_source) == shards(by_block)
    manifest = json.loads((by_block / "mergeflow-manifest.json").read_text())
    assert manifest["config"]["tokenizer"] == {"source": zoo["expert_1"]}
