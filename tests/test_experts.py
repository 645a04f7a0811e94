"""The expert store (mergeflow.experts) on local files: publishing, listing, the latest per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_folder
from lora_adapters import write_adapter

from mergeflow.errors import CheckpointError
from mergeflow.experts import base_uri, latest_per_task, list_experts, publish_expert
from mergeflow.fetch import fetch_model
from mergeflow.file_hashes import cache_dir
from mergeflow.hashing import model_sha256_at


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


def test_a_lora_adapter_of_the_base_is_published_as_the_adapter_and_merged_as_model_plus_adapter(
    zoo, tmp_path
):
    store = str(tmp_path / "store")
    adapter = write_adapter(tmp_path / "topic-lora", zoo["base"], ["model.layers.1.mlp.down_proj"])
    published = publish_expert(adapter, "fam", "topic", store, base_model=Path(zoo["base"]))
    assert [(e.uri, e.ref) for e in list_experts(store, "fam")] == [(published.uri, published.ref)]
    # Listing takes the stored files' hashes from the manifests (the store may be S3): it never
    # read the stored adapter to hash it.
    remembered = json.loads((cache_dir() / "file-hashes.json").read_text())
    assert not [path for path in remembered if path.startswith(store)]
    # stored as it is: the adapter's files and the manifest, kilobytes
    assert sorted(p.name for p in Path(published.uri).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "mergeflow-manifest.json"
    ]  # fmt: skip
    assert published.ref == f"{base_uri(store, 'fam')}+{published.uri}"
    # what a merge reads from it is the adapted model, and its hash is that model's
    adapted = load_folder(fetch_model(f"{zoo['base']}+{adapter}").path)
    stored = load_folder(fetch_model(published.ref).path)
    assert stored.keys() == adapted.keys()
    for name, value in adapted.items():
        assert value.equal(stored[name]), name
    assert not stored["model.layers.1.mlp.down_proj.weight"].equal(
        load_folder(zoo["base"])["model.layers.1.mlp.down_proj.weight"]
    )
    assert published.sha256 == model_sha256_at(f"{zoo['base']}+{adapter}")


def test_an_adapter_that_does_not_fit_the_base_is_refused_at_publishing(zoo, tmp_path):
    store = str(tmp_path / "store")
    adapter = write_adapter(tmp_path / "lora", zoo["base"], ["model.layers.1.mlp.down_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 3}))
    with pytest.raises(CheckpointError, match="do not have the rank r=3"):
        publish_expert(adapter, "fam", "topic", store, base_model=Path(zoo["base"]))
    assert list_experts(store, "fam") == []


def test_the_publish_command_says_how_an_adapter_expert_is_merged(zoo, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mergeflow.cli import app

    store = tmp_path / "artifacts"
    monkeypatch.setenv("MERGEFLOW_ARTIFACTS", str(store))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    adapter = write_adapter(tmp_path / "lora", zoo["base"], ["model.layers.1.mlp.down_proj"])
    command = ["expert", "publish", str(adapter), "--base", "fam", "--task", "topic"]
    result = CliRunner().invoke(app, [*command, "--base-model", zoo["base"]])
    assert result.exit_code == 0, result.output
    (version,) = list_experts(str(store), "fam")
    assert f"published {version.uri} (sha256 {version.sha256[:12]}, merged as {version.ref})" in result.output
    assert version.ref == f"{store}/bases/fam+{version.uri}"
