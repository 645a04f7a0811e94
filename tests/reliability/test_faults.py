"""Faults against real servers: S3 stopping mid-merge, a corrupted shard in S3, two merges
racing for one destination, MLflow down at registration. Each must fail clearly, leave nothing
that looks complete, and let a re-run finish exactly as an undisturbed run would."""

from __future__ import annotations

import json
import threading

import pytest
from s3_server import free_port, start_s3_server

from mergeflow.checkpoint import MANIFEST
from mergeflow.config import MergeConfig
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError, StorageError
from mergeflow.fetch import fetch_model, verify_manifest
from mergeflow.output import StagedOutput
from mergeflow.registry import RegistryError, register_merge
from mergeflow.settings import Settings
from mergeflow.stack import S3Service, down, up

BUCKET = "faults"


def ties(zoo: dict[str, str]) -> MergeConfig:
    return MergeConfig(
        merge_method="ties",
        base_model=zoo["base"],
        models=[{"model": zoo[f"expert_{i}"]} for i in range(4)],
        parameters={"density": 0.5},
    )


@pytest.fixture
def s3(tmp_path, monkeypatch):
    server = start_s3_server(tmp_path / "seaweedfs")
    server.client().create_bucket(Bucket=BUCKET)
    for name, value in {
        "MERGEFLOW_S3_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
    }.items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


def shard_hashes(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def test_s3_stopping_mid_merge_fails_clearly_and_a_rerun_matches_an_undisturbed_merge(zoo, s3, monkeypatch):
    undisturbed = merge(ties(zoo), f"s3://{BUCKET}/undisturbed", max_shard_bytes=60_000)
    commit = StagedOutput._commit_s3

    def stop_then_commit(stage):
        s3.stop()  # the server goes away after the shards are staged, as the upload starts
        commit(stage)

    monkeypatch.setattr(StagedOutput, "_commit_s3", stop_then_commit)
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/rerun"):
        merge(ties(zoo), f"s3://{BUCKET}/rerun", max_shard_bytes=60_000)
    monkeypatch.setattr(StagedOutput, "_commit_s3", commit)

    up(s3.settings, ["s3"])
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="rerun/").get("Contents", [])]
    assert f"rerun/{MANIFEST}" not in keys  # nothing looks complete
    rerun = merge(ties(zoo), f"s3://{BUCKET}/rerun", max_shard_bytes=60_000, overwrite=True)
    assert shard_hashes(rerun.manifest) == shard_hashes(undisturbed.manifest)


def test_a_corrupted_shard_in_s3_is_caught_by_the_manifest(zoo, s3):
    merged = merge(ties(zoo), f"s3://{BUCKET}/model", max_shard_bytes=60_000)
    shard = merged.manifest["files"][0]
    client = s3.client()
    body = bytearray(client.get_object(Bucket=BUCKET, Key=f"model/{shard['path']}")["Body"].read())
    body[-1] ^= 0xFF  # one flipped byte, same size
    client.put_object(Bucket=BUCKET, Key=f"model/{shard['path']}", Body=bytes(body))
    with pytest.raises(CheckpointError, match=f"{shard['path']} sha256 .* does not match the manifest"):
        fetch_model(f"s3://{BUCKET}/model")


def test_two_merges_racing_for_one_local_destination_leave_one_complete_model(zoo, tmp_path):
    destination = tmp_path / "out" / "merged"
    configs = [
        ties(zoo),
        MergeConfig(merge_method="average", models=[{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}]),
    ]
    errors: list[BaseException] = []

    def run(config):
        try:
            merge(config, str(destination), overwrite=True)
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(config,)) for config in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    manifest = json.loads((destination / MANIFEST).read_text())
    assert manifest["method"] in ("ties", "average")
    verify_manifest(destination)  # every file is the one its manifest lists
    assert sorted(p.name for p in destination.parent.iterdir()) == ["merged"]  # no staging left


@pytest.fixture
def mlflow_stack(tmp_path, monkeypatch):
    settings = Settings(
        home=tmp_path / "home", s3_port=free_port(), mlflow_port=free_port(), prefect_port=free_port()
    )
    up(settings, ["mlflow"], timeout=180)
    # One attempt per call: the test is about what mergeflow does when the server is away.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    credentials = S3Service(settings).credentials()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{settings.s3_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials.secret_key)
    yield settings
    down(settings)


def test_mlflow_down_at_registration_fails_clearly_and_a_rerun_registers_once(zoo, tmp_path, mlflow_stack):
    from test_registry import merged_folder

    uri = f"http://127.0.0.1:{mlflow_stack.mlflow_port}"
    record = merged_folder(zoo, tmp_path / "merged", "ties")
    record = type(record)(**{**vars(record), "model_sha256": "f" * 64})
    down(mlflow_stack, ["mlflow"])
    with pytest.raises(RegistryError, match=f"MLflow at {uri}"):
        register_merge(record, tracking_uri=uri)

    up(mlflow_stack, ["mlflow"], timeout=180)
    from mlflow import MlflowClient

    assert MlflowClient(uri).search_registered_models() == []  # no orphan version
    first = register_merge(record, tracking_uri=uri)
    again = register_merge(record, tracking_uri=uri)
    assert first.version == again.version == 1
    assert len(MlflowClient(uri).search_model_versions("name='mergeflow-tiny'")) == 1
