"""mergeflow.registry against a real MLflow store: a local sqlite file under tmp_path (one per
module, each test registering its own model family), and, marked slow, the stack's MLflow
server with artifacts in SeaweedFS S3."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.eval.metrics import TaskInfo, normalise
from mergeflow.registry import (
    MergeRecord,
    RegistryError,
    load_registered,
    register_merge,
    set_alias,
)

TASKS = {
    "sentiment": TaskInfo("classification", "held_in"),
    "topic": TaskInfo("classification", "held_in"),
    "part_of_speech": TaskInfo("syntax", "held_out"),
}


def merged_folder(zoo: dict[str, str], out: Path, method: str) -> MergeRecord:
    """Merge two experts of the generated zoo into `out` and describe it as the flow would."""
    experts = [zoo["expert_0"], zoo["expert_1"]]
    parameters = {"density": 0.5} if method == "ties" else {}
    config = {
        "merge_method": method,
        "base_model": zoo["base"],
        "models": [{"model": e} for e in experts],
        "parameters": parameters,
        "dtype": "float32",
    }
    manifest = merge(parse_config(config), str(out), max_shard_bytes=100_000).manifest
    hashes = {m["ref"]: m["sha256"] for m in [manifest["inputs"]["base"], *manifest["inputs"]["models"]]}
    raw = {
        ("merged", "sentiment"): 0.8,
        ("merged", "topic"): 0.6,
        ("merged", "part_of_speech"): 0.5,
        ("expert:sentiment", "sentiment"): 0.9,
        ("expert:topic", "topic"): 0.75,
        ("base", "part_of_speech"): 0.4,
    }
    table = normalise(raw, TASKS, "base", {"sentiment": "expert:sentiment", "topic": "expert:topic"})
    return MergeRecord(
        merged_folder=out,
        base_family="tiny",
        method=method,
        parameters={**parameters, "lambda": 1.0, "seed": 7},
        base=zoo["base"],
        experts=experts,
        input_hashes=hashes,
        scores=table[table.model == "merged"],
        output_uri=f"s3://models/merged/{method}",
        prefect_flow_run_id="0b5e-flow-run",
        prefect_flow_run_url="http://127.0.0.1:4200/runs/flow-run/0b5e-flow-run",
    )


@pytest.fixture(scope="module")
def merges(zoo, tmp_path_factory) -> dict[str, MergeRecord]:
    folder = tmp_path_factory.mktemp("merged")
    return {method: merged_folder(zoo, folder / method, method) for method in ("ties", "task_arithmetic")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """(tracking URI, artifact root) of a sqlite store shared by this module's tests."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts"


def family(record: MergeRecord, name: str) -> MergeRecord:
    """The record under another model family, so each test has a registered model of its own."""
    return MergeRecord(**{**vars(record), "base_family": name})


def assert_matches_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "mergeflow-manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == {p.name for p in folder.iterdir()} - {
        "mergeflow-manifest.json"
    }
    for entry in manifest["files"]:
        assert hashlib.sha256((folder / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_a_merge_becomes_a_run_and_successive_versions(merges, store):
    uri, artifact_root = store
    record = family(merges["ties"], "record")
    first = register_merge(record, tracking_uri=uri)
    second = register_merge(record, tracking_uri=uri)
    assert (first.model_name, first.version, first.model_uri) == (
        "mergeflow-record",
        1,
        "models:/mergeflow-record/1",
    )
    assert second.version == 2 and second.run_id != first.run_id

    client = MlflowClient(uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(artifact_root.as_uri()), "artifacts belong beside the database"
    params = run.data.params
    assert params["method"] == "ties" and params["density"] == "0.5" and params["lambda"] == "1.0"
    assert params["seed"] == "7" and params["expert_count"] == "2"
    assert params["base"] == record.base and params["experts"] == ",".join(record.experts)

    metrics = run.data.metrics
    assert metrics["raw/sentiment"] == pytest.approx(0.8)
    assert metrics["normalised/sentiment"] == pytest.approx(0.8 / 0.9)
    assert metrics["normalised/part_of_speech"] == pytest.approx(0.5 / 0.4)
    assert metrics["held_in_normalised_mean"] == pytest.approx((0.8 / 0.9 + 0.6 / 0.75) / 2)
    assert metrics["held_out_normalised_mean"] == pytest.approx(0.5 / 0.4)

    tags = run.data.tags
    assert tags["mergeflow.prefect_flow_run_id"] == "0b5e-flow-run"
    assert tags["mergeflow.prefect_flow_run_url"].endswith("/flow-run/0b5e-flow-run")
    assert tags["mergeflow.output_uri"] == "s3://models/merged/ties"
    assert tags["mergeflow.registered_model"] == "mergeflow-record/1"
    inputs = [record.base, *record.experts]
    for i, ref in enumerate(inputs):
        assert tags[f"mergeflow.input.{i}.ref"] == ref
        assert tags[f"mergeflow.input.{i}.sha256"] == record.input_hashes[ref]
    assert f"mergeflow.input.{len(inputs)}.ref" not in tags

    logged = {a.path for a in client.list_artifacts(first.run_id, "model")}
    assert logged == {f"model/{p.name}" for p in record.merged_folder.iterdir()}
    scores = client.download_artifacts(first.run_id, "scores/scores.csv", str(artifact_root.parent / "dl"))
    assert Path(scores).read_text().splitlines()[0] == "task,category,kind,model,raw,normalised"

    version = client.get_model_version("mergeflow-record", "1")
    assert version.run_id == first.run_id and version.source == f"runs:/{first.run_id}/model"


def test_load_by_version_and_alias_verifies_and_loads_in_transformers(merges, store, tmp_path):
    from transformers import AutoModelForCausalLM

    uri, _ = store
    ties = register_merge(family(merges["ties"], "alias"), tracking_uri=uri)
    average = register_merge(family(merges["task_arithmetic"], "alias"), tracking_uri=uri)

    set_alias(ties.model_name, "champion", ties.version, tracking_uri=uri)
    champion = load_registered(ties.model_name, "champion", tracking_uri=uri, dest=tmp_path / "champion")
    assert champion == tmp_path / "champion"
    assert_matches_manifest(champion)
    expected = json.loads((merges["ties"].merged_folder / "mergeflow-manifest.json").read_text())
    assert json.loads((champion / "mergeflow-manifest.json").read_text()) == expected
    model = AutoModelForCausalLM.from_pretrained(champion)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    # Promotion moves the alias; the number still names the old version.
    set_alias(ties.model_name, "champion", average.version, tracking_uri=uri)
    promoted = load_registered(ties.model_name, "champion", tracking_uri=uri)
    assert json.loads((promoted / "mergeflow-manifest.json").read_text())["method"] == "task_arithmetic"
    by_number = load_registered(ties.model_name, "1", tracking_uri=uri)
    assert json.loads((by_number / "mergeflow-manifest.json").read_text())["method"] == "ties"
    assert not list(tmp_path.glob(".*partial*")), "no staging folder is left behind"


def test_corrupt_or_unverifiable_downloads_are_refused(merges, store, tmp_path):
    uri, artifact_root = store
    registered = register_merge(family(merges["ties"], "corrupt"), tracking_uri=uri)
    stored = artifact_root / registered.run_id / "artifacts" / "model"
    shard = sorted(stored.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        RegistryError, match=rf"mergeflow-corrupt version 1: {shard.name} sha256 .* does not match"
    ):
        load_registered("mergeflow-corrupt", "1", tracking_uri=uri, dest=tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []

    (stored / "mergeflow-manifest.json").unlink()
    with pytest.raises(
        RegistryError, match="mergeflow-corrupt version 1: mergeflow-manifest.json is missing"
    ):
        load_registered("mergeflow-corrupt", "1", tracking_uri=uri, dest=tmp_path / "bad")

    with pytest.raises(RegistryError, match="mergeflow-corrupt 7 at .*no such registered model version"):
        load_registered("mergeflow-corrupt", "7", tracking_uri=uri)
    with pytest.raises(RegistryError, match="mergeflow-corrupt champion"):
        load_registered("mergeflow-corrupt", "champion", tracking_uri=uri)


def test_bad_records_are_refused_and_long_params_truncated(merges, store, tmp_path):
    uri, _ = store
    record = family(merges["ties"], "checks")
    unmanifested = tmp_path / "plain"
    unmanifested.mkdir()
    (unmanifested / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match=f"{unmanifested}: mergeflow-manifest.json is missing"):
        register_merge(MergeRecord(**{**vars(record), "merged_folder": unmanifested}), tracking_uri=uri)
    with pytest.raises(RegistryError, match="score table must hold one model"):
        both = record.scores.assign(model=["merged", "base", "merged"])
        register_merge(MergeRecord(**{**vars(record), "scores": both}), tracking_uri=uri)
    with pytest.raises(RegistryError, match=f"input {record.experts[1]}: no content sha256"):
        hashes = {k: v for k, v in record.input_hashes.items() if k != record.experts[1]}
        register_merge(MergeRecord(**{**vars(record), "input_hashes": hashes}), tracking_uri=uri)

    long = MergeRecord(**{**vars(record), "parameters": {"notes": "x" * 7000}, "scores": None})
    registered = register_merge(long, tracking_uri=uri)
    run = MlflowClient(uri).get_run(registered.run_id)
    assert len(run.data.params["notes"]) == 6000 and run.data.params["notes"].endswith("...")
    assert run.data.tags["mergeflow.truncated_params"].startswith("notes cut to 6000 characters")
    assert not any(key.startswith(("raw/", "normalised/")) for key in run.data.metrics)


def test_default_store_is_sqlite_under_mergeflow_home(merges, tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MERGEFLOW_SETTINGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # MLflow's own default would put artifacts in ./mlruns here
    registered = register_merge(family(merges["ties"], "home"))
    assert (tmp_path / "home" / "mlflow" / "mlflow.db").is_file()
    assert (tmp_path / "home" / "mlflow" / "artifacts" / registered.run_id / "artifacts" / "model").is_dir()
    assert not (tmp_path / "mlruns").exists()
    assert_matches_manifest(load_registered(registered.model_name, "1"))


@pytest.mark.slow
def test_registry_through_the_stacks_mlflow_server_into_s3(merges, tmp_path, monkeypatch):
    import socket

    from mergeflow.settings import Settings
    from mergeflow.stack import S3Service, down, s3_client, up

    for name in list(os.environ):
        if name.startswith(("AWS_", "MLFLOW_", "PREFECT_", "MERGEFLOW_")) and name != "MERGEFLOW_CACHE_DIR":
            monkeypatch.delenv(name)
    sockets = [socket.socket() for _ in range(3)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    settings = Settings(home=tmp_path / "home", s3_port=ports[0], mlflow_port=ports[1], prefect_port=ports[2])
    try:
        up(settings, names=["mlflow"])
        uri = f"http://127.0.0.1:{settings.mlflow_port}"
        first = register_merge(family(merges["ties"], "stack"), tracking_uri=uri)
        second = register_merge(family(merges["ties"], "stack"), tracking_uri=uri)
        assert (first.version, second.version) == (1, 2)
        assert MlflowClient(uri).get_run(first.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")

        service = S3Service(settings)
        s3 = s3_client(service.url(service.port), service.credentials())
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix="mlflow/")["Contents"]]
        assert any(key.endswith(f"{first.run_id}/artifacts/model/mergeflow-manifest.json") for key in keys), (
            keys
        )

        set_alias(first.model_name, "champion", 1, tracking_uri=uri)
        assert_matches_manifest(load_registered(first.model_name, "champion", tracking_uri=uri))
    finally:
        down(settings)
