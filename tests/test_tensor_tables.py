"""Inputs whose tensors differ where transformers does not mind: a model that ties its output head
to its embeddings takes part with them (mergekit's tied name), the output following the
reference; buffers older transformers saved (rotary inv_freq) are not weights."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_folder, rewrite_safetensors
from reference_merge import reference_merge

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.task_vectors import ensure_task_vector
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

HEAD, EMBEDDINGS = "lm_head.weight", "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return build_generated_zoo(tmp_path_factory.mktemp("tied"), GeneratedZooSpec(num_experts=2, seed=11))


def tied_copy(model: str, target: Path) -> str:
    """`model` saved as transformers saves a tied model: no head, tie_word_embeddings set."""
    shutil.copytree(model, target)
    (target / "mergeflow-manifest.json").unlink(missing_ok=True)
    rewrite_safetensors(target / "model.safetensors", lambda tensors: tensors.pop(HEAD))
    config = json.loads((target / "config.json").read_text()) | {"tie_word_embeddings": True}
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def ties(base: str, experts: list[str]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": e} for e in experts],
        "parameters": {"density": 0.5},
    }


def test_an_expert_that_ties_its_head_takes_part_with_its_embeddings(zoo, tmp_path):
    tied = tied_copy(zoo["expert_1"], tmp_path / "tied")
    merge(parse_config(ties(zoo["base"], [zoo["expert_0"], tied])), str(tmp_path / "out"))
    as_read = load_folder(tied)
    as_read[HEAD] = as_read[EMBEDDINGS]
    expected = reference_merge("ties", load_folder(zoo["base"]), [load_folder(zoo["expert_0"]), as_read])
    got = load_folder(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-7, msg=name)
    # and in a slice, where the head comes from the last slice's sources
    sources = [{"model": m, "layer_range": [0, 2]} for m in (zoo["base"], zoo["expert_0"], tied)]
    sliced = ties(zoo["base"], []) | {"models": [], "slices": [{"sources": sources}]}
    merge(parse_config(sliced), str(tmp_path / "sliced"))
    torch.testing.assert_close(load_folder(tmp_path / "sliced")[HEAD], expected[HEAD], rtol=0, atol=1e-7)


def test_a_base_that_ties_its_head_gives_a_tied_output(zoo, tmp_path, caplog):
    base = tied_copy(zoo["base"], tmp_path / "tied-base")
    with caplog.at_level(logging.WARNING, logger="mergeflow.tied_head"):
        merge(parse_config(ties(base, [zoo["expert_0"], zoo["expert_1"]])), str(tmp_path / "out"))
    experts = [load_folder(zoo[k]) for k in ("expert_0", "expert_1")]
    for state in experts:
        del state[HEAD]
    expected = reference_merge("ties", load_folder(base), experts)
    got = load_folder(tmp_path / "out")
    assert sorted(got) == sorted(expected) and HEAD not in got
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-7, msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    # the experts' configs untie their heads: saying what is not merged
    assert [r.getMessage() for r in caplog.records] == [
        f"'{zoo[k]}': its '{HEAD}' is not merged: the output ties its head to the embeddings, "
        f"as '{base}' does"
        for k in ("expert_0", "expert_1")
    ]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_the_task_vector_of_an_expert_that_ties_its_head(zoo, tmp_path):
    tied = tied_copy(zoo["expert_1"], tmp_path / "tied")
    vector = ensure_task_vector(zoo["base"], tied, str(tmp_path / "store"))
    tau, expert, base = load_folder(vector.uri), load_folder(tied), load_folder(zoo["base"])
    torch.testing.assert_close(tau[HEAD], expert[EMBEDDINGS] - base[HEAD], rtol=0, atol=0)
    config = {"merge_method": "task_arithmetic", "base_model": zoo["base"], "models": [{"model": vector.uri}]}
    merge(parse_config(config), str(tmp_path / "out"))
    torch.testing.assert_close(load_folder(tmp_path / "out")[HEAD], expert[EMBEDDINGS], rtol=0, atol=1e-7)


def test_rotary_buffers_saved_by_older_transformers_are_not_weights(zoo, tmp_path):
    older = Path(tmp_path / "older")
    shutil.copytree(zoo["expert_1"], older)
    (older / "mergeflow-manifest.json").unlink(missing_ok=True)
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_safetensors(older / "model.safetensors", lambda tensors: tensors.update({buffer: torch.ones(8)}))
    merge(parse_config(ties(zoo["base"], [zoo["expert_0"], str(older)])), str(tmp_path / "out"))
    merge(parse_config(ties(zoo["base"], [zoo["expert_0"], zoo["expert_1"]])), str(tmp_path / "plain"))
    got, plain = load_folder(tmp_path / "out"), load_folder(tmp_path / "plain")
    assert sorted(got) == sorted(plain) and buffer not in got
    assert all(torch.equal(got[name], plain[name]) for name in plain)
