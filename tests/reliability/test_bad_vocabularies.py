"""Models with different tokenizers that cannot be merged as asked: each refusal names the
model or tensor and leaves nothing (tests/test_vocabulary.py has the merges that work)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_bad_inputs import assert_fails_cleanly
from vocabulary_zoo import BASE, with_paths, write_model, write_zoo

from mergeflow.errors import CheckpointError, ConfigError, IncompatibleModelsError


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return write_zoo(tmp_path_factory.mktemp("vocab"), torch.float32)


def union_config(zoo: dict[str, str], **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": zoo["base"],
        "models": [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}],
        "tokenizer_source": "union",
    } | extra


def test_different_vocabularies_without_a_source_are_refused_with_the_way_out(zoo, tmp_path):
    assert_fails_cleanly(
        union_config(zoo, tokenizer_source=None),
        tmp_path,
        IncompatibleModelsError,
        "vocab sizes differ",
        "give tokenizer_source (union, base or a model)",
    )


def test_a_base_without_a_tokenizer(zoo, tmp_path):
    bare = tmp_path / "bare"
    write_model(bare, BASE, 0, torch.float32)
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink()
    assert_fails_cleanly(
        union_config(zoo, base_model=str(bare)),
        tmp_path,
        ConfigError,
        f"model '{bare}' has no tokenizer files",
    )


def test_a_tokenizer_with_tokens_past_the_vocab_size(zoo, tmp_path):
    short = tmp_path / "short"
    write_model(short, BASE, 0, torch.float32)
    config = json.loads((short / "config.json").read_text()) | {"vocab_size": 4}
    (short / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(
        union_config(zoo, base_model=str(short)),
        tmp_path,
        CheckpointError,
        f"model '{short}'",
        "2 token(s) at ids past its vocab_size 4 (first 'c')",
    )


def test_embeddings_that_do_not_fit_the_vocab_size(zoo, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(zoo["expert_1"], odd)
    config = json.loads((odd / "config.json").read_text()) | {"vocab_size": 8}  # 7 rows
    (odd / "config.json").write_text(json.dumps(config))
    models = [{"model": zoo["expert_0"]}, {"model": str(odd)}]
    assert_fails_cleanly(
        union_config(zoo, models=models),
        tmp_path,
        IncompatibleModelsError,
        f"tensor 'lm_head.weight': 7 rows in '{odd}', whose vocab_size is 8",
    )


@pytest.mark.parametrize(
    "given, message",
    [
        ({"g": {"source": "base"}}, "tokenizer.tokens.g.source: model '{base}' has no token 'g'"),
        (
            {"g": {"source": {"kind": "model_token", "model": "base", "token_id": 6}}},
            "tokenizer.tokens.g.source: row 6 is outside model '{base}' (vocab_size 6)",
        ),
        (
            {"g": {"source": {"kind": "model_token", "model": "base", "token": "zz"}}},
            "tokenizer.tokens.g.source: model '{base}' has no token 'zz'",
        ),
    ],
)
def test_token_sources_that_name_what_the_model_lacks_are_refused(zoo, tmp_path, given, message):
    block = {"source": "union", "tokens": with_paths(given, zoo)}
    config = union_config(zoo, tokenizer_source=None, tokenizer=block)
    assert assert_fails_cleanly(config, tmp_path, ConfigError) == message.format(base=zoo["base"])
