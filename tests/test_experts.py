"""The expert store (mergeflow.experts) on local files: publishing, listing, the latest per task."""

from __future__ import annotations

from pathlib import Path

from conftest import load_folder
from lora_adapters import write_adapter

from mergeflow.experts import latest_per_task, list_experts, publish_expert
from mergeflow.fetch import fetch_model


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


def test_a_lora_adapter_of_the_base_is_published_as_the_whole_adapted_model(zoo, tmp_path):
    store = str(tmp_path / "store")
    adapter = write_adapter(tmp_path / "topic-lora", zoo["base"], ["model.layers.1.mlp.down_proj"])
    published = publish_expert(adapter, "fam", "topic", store, base_model=Path(zoo["base"]))
    assert [e.uri for e in list_experts(store, "fam")] == [published.uri]
    stored = load_folder(published.uri)
    adapted = load_folder(fetch_model(f"{zoo['base']}+{adapter}").path)
    assert stored.keys() == adapted.keys()
    for name, value in adapted.items():
        assert value.equal(stored[name]), name
    assert not stored["model.layers.1.mlp.down_proj.weight"].equal(
        load_folder(zoo["base"])["model.layers.1.mlp.down_proj.weight"]
    )
    assert (Path(published.uri) / "config.json").is_file()
