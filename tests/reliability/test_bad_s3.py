"""Bad S3 input: a missing model or bucket, wrong credentials, a merge that fails midway.
Each gives one clear error naming the URI (never the secret) and leaves nothing at the
destination, or the previous model untouched (server and zoo: tests/s3_zoo.py)."""

from __future__ import annotations

import re
import tempfile

import pytest
from s3_zoo import (
    EXPERTS,
    FAKE_SECRET,
    NAN_TENSOR,
    SHARD_BYTES,
    break_expert,
    cli_config,
    run_cli,
    ties_config,
)

from mergeflow.checkpoint import MANIFEST, open_checkpoint
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError, MergeflowError, NonFiniteError, StorageError


@pytest.mark.parametrize("source", ["local", "s3"])
def test_failed_merge_leaves_no_object_at_the_s3_destination(
    s3, local_zoo, s3_zoo, tmp_path, monkeypatch, source
):
    bad = tmp_path / "expert_1-nan"
    shard = break_expert(local_zoo["expert_1"], bad)
    if source == "s3":
        s3.fs.put(f"{bad}/", f"{s3.bucket}/broken/expert_1-nan", recursive=True)
        models, bad_ref = s3_zoo, s3.uri("broken/expert_1-nan")
        bad_file = f"{bad_ref}/{shard}"
    else:
        models, bad_ref = local_zoo, str(bad)
        bad_file = str(bad / shard)
    experts = [models["expert_0"], bad_ref, models["expert_2"]]
    stage_root = tmp_path / "staging"
    stage_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(stage_root))

    prefix = f"merged/nan-{source}"
    with pytest.raises(NonFiniteError) as err:
        merge(ties_config(models, experts), s3.uri(prefix), max_shard_bytes=SHARD_BYTES)
    assert bad_file in str(err.value) and NAN_TENSOR in str(err.value)
    assert not s3.fs.exists(f"{s3.bucket}/{prefix}/{MANIFEST}")
    assert s3.keys(prefix) == []
    assert list(stage_root.iterdir()) == [], "the local staging folder must be removed"


def test_failed_overwrite_keeps_the_previous_s3_model(s3, local_zoo, tmp_path):
    out = s3.uri("merged/keep-on-failure")
    merge(ties_config(local_zoo), out, max_shard_bytes=SHARD_BYTES)
    before = {k: s3.read(f"merged/keep-on-failure/{k}") for k in s3.keys("merged/keep-on-failure")}

    bad = tmp_path / "expert_2-nan"
    break_expert(local_zoo["expert_2"], bad)
    with pytest.raises(NonFiniteError):
        experts = [local_zoo["expert_0"], local_zoo["expert_1"], str(bad)]
        merge(ties_config(local_zoo, experts), out, overwrite=True)
    after = {k: s3.read(f"merged/keep-on-failure/{k}") for k in s3.keys("merged/keep-on-failure")}
    assert after == before


def test_missing_s3_model_names_the_uri(s3, local_zoo):
    ref = s3.uri("does-not-exist")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(ref)
    assert ref in str(err.value) and "\n" not in str(err.value)

    out = s3.uri("merged/missing-input")
    with pytest.raises(CheckpointError, match=re.escape(ref)):
        merge(ties_config(local_zoo, [local_zoo["expert_0"], ref]), out)
    assert s3.keys("merged/missing-input") == []


def test_missing_bucket_is_named_and_not_created(s3, s3_zoo):
    bucket = "mergeflow-no-such-bucket"
    ref = f"s3://{bucket}/base"
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(ref)
    assert bucket in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=re.escape(ref)):
        merge(ties_config(s3_zoo, [s3_zoo["expert_0"], ref]), s3.uri("merged/missing-bucket"))
    assert bucket not in [b["name"].rstrip("/") for b in s3.fs.ls("", detail=True, refresh=True)]


@pytest.mark.parametrize("wrong", ["secret", "access-key"])
def test_wrong_credentials_give_a_mergeflow_error_without_the_secret(
    s3, local_zoo, s3_zoo, monkeypatch, wrong
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    if wrong == "access-key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "MERGEFLOWUNKNOWNKEY")

    with pytest.raises(MergeflowError) as err:
        open_checkpoint(s3_zoo["base"])
    message = str(err.value)
    assert s3_zoo["base"] in message and "credentials" in message and FAKE_SECRET not in message

    with pytest.raises(MergeflowError) as err:
        merge(ties_config(s3_zoo), s3.uri("merged/bad-credentials"))
    assert "credentials" in str(err.value) and FAKE_SECRET not in str(err.value)

    out = s3.uri("merged/bad-credentials")
    with pytest.raises(StorageError) as err:
        merge(ties_config(local_zoo), out)
    message = str(err.value)
    assert out in message and "credentials" in message and FAKE_SECRET not in message
    assert "\n" not in message
    assert s3.keys("merged/bad-credentials") == []


@pytest.mark.parametrize("failure", ["missing-model", "wrong-secret"])
def test_cli_s3_failure_is_one_error_line(s3, s3_zoo, tmp_path, failure):
    experts = [s3_zoo[e] for e in EXPERTS]
    env = s3.env()
    if failure == "missing-model":
        missing = s3.uri("does-not-exist-cli")
        experts[1] = missing
    else:
        env = s3.env(secret_key=FAKE_SECRET)
    out = s3.uri(f"cli/{failure}")
    proc = run_cli(cli_config(s3_zoo["base"], experts), out, tmp_path, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    if failure == "missing-model":
        assert missing in lines[0]
    else:
        assert "credentials" in lines[0] and FAKE_SECRET not in lines[0]
    assert s3.keys(f"cli/{failure}") == []
