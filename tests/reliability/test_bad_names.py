"""Names that end up in storage paths or registry names: traversal and separators are refused
before anything is written; publishing the same expert twice changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.merge_and_evaluate import MergeRequest
from mergeflow.errors import ConfigError
from mergeflow.experts import list_experts, publish_expert
from mergeflow.registry import model_name


@pytest.mark.parametrize(
    ("base", "task", "bad"),
    [
        ("tiny", "../../escape", "task"),
        ("../tiny", "topic", "base"),
        ("ti/ny", "topic", "base"),
        ("tiny", ".hidden", "task"),
    ],
)
def test_traversal_in_expert_names_is_refused_and_nothing_is_written(zoo, tmp_path, base, task, bad):
    store = tmp_path / "store"
    with pytest.raises(ConfigError, match=f"{bad} name .* is not allowed"):
        publish_expert(Path(zoo["expert_0"]), base, task, str(store), Path(zoo["base"]))
    assert not store.exists()


def test_an_unsafe_base_family_is_refused_by_the_request_and_the_registry():
    with pytest.raises(ValidationError, match="base_family"):
        MergeRequest(base="./b", base_family="a/../b", experts={"topic": "./e"})
    with pytest.raises(ConfigError, match="base family name 'a b' is not allowed"):
        model_name("a b")


def test_publishing_the_same_expert_twice_is_one_expert(zoo, tmp_path):
    store = str(tmp_path / "store")
    first = publish_expert(Path(zoo["expert_0"]), "tiny", "topic", store, Path(zoo["base"]))
    manifest = Path(first.uri, "mergeflow-manifest.json").read_text()
    again = publish_expert(Path(zoo["expert_0"]), "tiny", "topic", store)
    assert again.uri == first.uri and again.sha256 == first.sha256
    assert Path(first.uri, "mergeflow-manifest.json").read_text() == manifest  # not rewritten
    assert [e.uri for e in list_experts(store)] == [first.uri]
