"""Faults against real servers and files: S3 stopping mid-merge, a corrupted shard in S3, two
merges racing for one destination, MLflow down at registration, a disk that refuses a shard,
what a killed merge left.
Each must fail clearly, leave nothing that looks complete, and let a re-run finish exactly as
an undisturbed run would."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time

import pytest
import yaml
from s3_server import free_ports, start_s3_server

from mergeflow import write_lock
from mergeflow.checkpoint import MANIFEST
from mergeflow.config import MergeConfig
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError, StorageError
from mergeflow.fetch import fetch_model, verify_manifest
from mergeflow.output import StagedOutput
from mergeflow.registry import RegistryError, register_merge
from mergeflow.scratch import HOST, process_tagged
from mergeflow.settings import Settings
from mergeflow.stack import S3Service, down, up
from mergeflow.write_lock import LOCK_NAME, WriteLock

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


def average(zoo: dict[str, str]) -> MergeConfig:
    return MergeConfig(
        merge_method="average", models=[{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}]
    )


def shard_hashes(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def s3_keys(s3, prefix: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix) :] for o in listing)


def test_s3_stopping_mid_merge_fails_clearly_and_a_rerun_matches_an_undisturbed_merge(zoo, s3, monkeypatch):
    undisturbed = merge(ties(zoo), f"s3://{BUCKET}/undisturbed", max_shard_bytes=60_000)
    refresh = WriteLock.refresh
    uploads = []

    def stop_during_upload(lock):
        uploads.append(lock)
        if len(uploads) == 3:  # two shards are up; the server goes away before the third
            s3.stop()
        refresh(lock)

    monkeypatch.setattr(WriteLock, "refresh", stop_during_upload)
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/rerun"):
        merge(ties(zoo), f"s3://{BUCKET}/rerun", max_shard_bytes=60_000)
    monkeypatch.setattr(WriteLock, "refresh", refresh)

    up(s3.settings, ["s3"])
    keys = s3_keys(s3, "rerun/")
    assert MANIFEST not in keys  # nothing looks complete
    assert LOCK_NAME in keys  # the server was away when the writer tried to release its lock
    rerun = merge(ties(zoo), f"s3://{BUCKET}/rerun", max_shard_bytes=60_000, overwrite=True)
    assert shard_hashes(rerun.manifest) == shard_hashes(undisturbed.manifest)
    assert LOCK_NAME not in s3_keys(s3, "rerun/")


def test_two_merges_racing_for_one_s3_destination_leave_one_complete_model(zoo, s3, monkeypatch):
    destination = f"s3://{BUCKET}/raced"
    configs = [ties(zoo), average(zoo)]
    both_staged = threading.Barrier(len(configs))
    commit = StagedOutput._commit_s3

    def commit_together(stage):
        both_staged.wait(timeout=120)  # both writers start their upload at the same moment
        commit(stage)

    monkeypatch.setattr(StagedOutput, "_commit_s3", commit_together)
    errors = race(
        [lambda c=c: merge(c, destination, max_shard_bytes=60_000, overwrite=True) for c in configs]
    )
    assert errors == []
    fetched = fetch_model(destination)  # every file is the one the manifest lists (sha256)
    assert json.loads((fetched.path / MANIFEST).read_text())["method"] in ("ties", "average")
    assert LOCK_NAME not in s3_keys(s3, "raced/")


def test_without_overwrite_the_second_of_two_racing_merges_fails_and_the_first_stays_whole(
    zoo, s3, monkeypatch
):
    destination = f"s3://{BUCKET}/first-wins"
    configs = [ties(zoo), average(zoo)]
    both_staged = threading.Barrier(len(configs))
    commit = StagedOutput._commit_s3

    def commit_together(stage):
        both_staged.wait(timeout=120)
        commit(stage)

    monkeypatch.setattr(StagedOutput, "_commit_s3", commit_together)
    errors = race([lambda c=c: merge(c, destination, max_shard_bytes=60_000) for c in configs])
    assert len(errors) == 1 and isinstance(errors[0], StorageError)
    assert "already exists (another writer finished first" in str(errors[0])
    assert (fetch_model(destination).path / MANIFEST).is_file()  # fetched and checked against it


def test_a_writer_that_died_holding_the_lock_is_taken_over_and_a_live_one_waited_for(zoo, s3, monkeypatch):
    destination = f"s3://{BUCKET}/locked"
    client = s3.client()

    def leave_lock(owner: str, age_s: float) -> None:
        body = {"owner": owner, "refreshed_at": time.time() - age_s, "refreshed": "then"}
        client.put_object(Bucket=BUCKET, Key=f"locked/{LOCK_NAME}", Body=json.dumps(body).encode())

    monkeypatch.setattr(write_lock, "WAIT_S", 2)
    leave_lock("build-host-7:4242:feedbeef", age_s=5)  # another machine, writing right now
    with pytest.raises(StorageError, match=r"locked/\.write-lock: another writer \(build-host-7:4242"):
        merge(ties(zoo), destination, max_shard_bytes=60_000)
    assert s3_keys(s3, "locked/") == [LOCK_NAME]  # nothing of ours was uploaded

    leave_lock("build-host-7:4242:feedbeef", age_s=write_lock.STALE_AFTER_S + 60)  # it stopped refreshing
    merge(ties(zoo), destination, max_shard_bytes=60_000)
    assert LOCK_NAME not in s3_keys(s3, "locked/")
    assert (fetch_model(destination).path / MANIFEST).is_file()  # fetched and checked against it


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
    errors = race([lambda c=c: merge(c, str(destination), overwrite=True) for c in (ties(zoo), average(zoo))])
    assert errors == []
    manifest = json.loads((destination / MANIFEST).read_text())
    assert manifest["method"] in ("ties", "average")
    verify_manifest(destination)  # every file is the one its manifest lists
    assert sorted(p.name for p in destination.parent.iterdir()) == ["merged"]  # no staging left


def test_a_disk_that_refuses_a_shard_fails_the_merge_in_one_line_and_leaves_nothing(zoo, tmp_path):
    """A write of the output fails (here at the process's file-size limit, EFBIG: the same path
    as a full disk's ENOSPC): one line naming the shard, no traceback, nothing staged left."""
    config = tmp_path / "average.yaml"
    config.write_text(yaml.safe_dump(average(zoo).model_dump(mode="json", exclude_defaults=True)))
    out = tmp_path / "out" / "merged"
    limit = 256 * 1024  # above numba's cache files, below the merged model's ~460 KB shard

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "mergeflow.cli", "merge", str(config), "--out", str(out), "-q"]
    run = subprocess.run(
        [*command, "--shard-size", "10MB"], preexec_fn=limit_file_size, capture_output=True, text=True
    )
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: ") and line.endswith("model.safetensors: cannot write: File too large")
    assert not out.exists() and list(out.parent.iterdir()) == []

    run = subprocess.run(command, capture_output=True, text=True)  # the disk has room again
    assert run.returncode == 0, run.stderr
    verify_manifest(out)


def race(writers) -> list[BaseException]:
    """Run each writer in its own thread at once; the errors they raised."""
    errors: list[BaseException] = []

    def run(writer):
        try:
            writer()
        except BaseException as error:  # noqa: BLE001 - collected and asserted by the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(writer,)) for writer in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.fixture
def mlflow_stack(tmp_path, monkeypatch):
    s3_port, mlflow_port, prefect_port = free_ports(3)
    settings = Settings(
        home=tmp_path / "home", s3_port=s3_port, mlflow_port=mlflow_port, prefect_port=prefect_port
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


def test_what_a_killed_merge_left_is_removed_by_the_next_merge_into_that_output(zoo, tmp_path):
    """A merge killed mid-write leaves its staging folder (never anything that looks complete);
    one killed while replacing an output, the old output renamed aside. Both are named with the
    process id, and the next merge into that output removes those of processes that are gone."""
    destination = tmp_path / "out" / "merged"
    destination.parent.mkdir(parents=True)
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = int(ended.stdout)
    left = [destination.parent / process_tagged(f".merged.{kind}", gone) for kind in ("partial", "old")]
    running = destination.parent / process_tagged(".merged.partial", os.getppid())  # a merge still running
    # The same pid on another machine sharing this folder: not known to be gone.
    elsewhere = destination.parent / process_tagged(".merged.partial", gone).replace(HOST, "0f0f0f0f")
    for folder in [*left, running, elsewhere]:
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    merge(ties(zoo), str(destination))
    verify_manifest(destination)
    assert sorted(p.name for p in destination.parent.iterdir()) == sorted(
        [running.name, elsewhere.name, "merged"]
    )
