"""The expert store (mergeflow.experts) on local files: publishing, listing, the latest per task."""

from __future__ import annotations

from pathlib import Path

from mergeflow.experts import latest_per_task, list_experts, publish_expert


def test_the_latest_expert_of_a_task_is_the_last_published_even_within_one_second(zoo, tmp_path):
    store = str(tmp_path / "store")
    published = [
        publish_expert(Path(zoo["expert_0"]), "fam", "topic", store, base_model=Path(zoo["base"])),
        publish_expert(Path(zoo["expert_1"]), "fam", "topic", store),
        publish_expert(Path(zoo["expert_2"]), "fam", "topic", store),
        publish_expert(Path(zoo["expert_3"]), "fam", "sentiment", store),
    ]
    # A burst: all four land within a second or two, and their hashes sort in another order.
    experts = list_experts(store, "fam")
    assert [e.uri for e in experts] == [e.uri for e in published]
    latest = latest_per_task(experts)
    assert {task: e.uri for task, e in latest.items()} == {
        "sentiment": published[3].uri,
        "topic": published[2].uri,
    }
