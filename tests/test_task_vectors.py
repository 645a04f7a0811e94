"""Task vectors as stored checkpoints: τ = expert − base on disk, reused by key, and merges from
stored vectors that match merges of the experts themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_folder

from mergeflow.checkpoint import MANIFEST
from mergeflow.config import MergeConfig
from mergeflow.engine import merge
from mergeflow.errors import IncompatibleModelsError
from mergeflow.task_vectors import MARKER, ensure_task_vector

PARAMETERS = {
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.5, "lambda": 0.8},
    "dare_ties": {"density": 0.5, "lambda": 0.8, "seed": 3},
    "breadcrumbs": {"density": 0.5},
    "model_stock": {},
    "average": {},
    "sce": {"select_topk": 0.5},
    "multislerp": {},
    "karcher": {},
}


@pytest.fixture(scope="module")
def vectors(zoo, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    experts = [zoo[f"expert_{i}"] for i in range(4)]
    return store, [ensure_task_vector(zoo["base"], expert, store) for expert in experts]


def test_a_task_vector_is_expert_minus_base_with_lineage(zoo, vectors):
    _, stored = vectors
    base, expert, tau = load_folder(zoo["base"]), load_folder(zoo["expert_1"]), load_folder(stored[1].uri)
    assert set(tau) == set(base)
    for name in base:
        assert tau[name].dtype == torch.float32
        torch.testing.assert_close(tau[name], expert[name].float() - base[name].float(), rtol=0, atol=0)
    config = json.loads(Path(stored[1].uri, "config.json").read_text())
    assert config[MARKER]["expert"] == zoo["expert_1"]
    assert config[MARKER]["base_sha256"] == stored[1].base_sha256
    manifest = json.loads(Path(stored[1].uri, MANIFEST).read_text())
    assert manifest["kind"] == "task_vector"


def test_a_stored_vector_is_reused_not_recomputed(zoo, vectors):
    store, stored = vectors
    assert all(v.computed for v in stored)
    again = ensure_task_vector(zoo["base"], zoo["expert_0"], store)
    assert not again.computed and again.uri == stored[0].uri


@pytest.mark.parametrize("method", sorted(PARAMETERS))
def test_merging_stored_vectors_matches_merging_the_experts(zoo, vectors, tmp_path, method):
    _, stored = vectors
    parameters = PARAMETERS[method]

    def run(models, out):
        config = MergeConfig(
            merge_method=method,
            base_model=zoo["base"],
            models=[{"model": m} for m in models],
            parameters=parameters,
        )
        return merge(config, str(tmp_path / out))

    from_experts = run([zoo[f"expert_{i}"] for i in range(4)], "experts")
    from_vectors = run([v.uri for v in stored], "vectors")
    a, b = load_folder(from_experts.output), load_folder(from_vectors.output)
    for name in a:
        # base + (expert − base) differs from expert by float32 rounding only.
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    lineage = from_vectors.manifest["inputs"]["models"][2]
    assert lineage["task_vector_of"]["ref"] == zoo["expert_2"]


def test_a_vector_of_another_base_is_refused(zoo, vectors, tmp_path):
    _, stored = vectors
    config = MergeConfig(
        merge_method="task_arithmetic", base_model=zoo["expert_3"], models=[{"model": stored[0].uri}]
    )
    with pytest.raises(IncompatibleModelsError, match="computed from base .* not from this merge's base"):
        merge(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_vector_without_a_base_is_refused(vectors, tmp_path):
    _, stored = vectors
    config = MergeConfig(merge_method="average", models=[{"model": stored[0].uri}, {"model": stored[1].uri}])
    with pytest.raises(IncompatibleModelsError, match="is a task vector; the merge needs its base_model"):
        merge(config, str(tmp_path / "out"))
