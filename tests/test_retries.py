"""Retries: a failure a retry may cure (S3 unreachable, MLflow server error) is retried with
backoff; a missing or corrupt model fails at once."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from prefect import flow, task

from mergeflow.errors import CheckpointError, StorageError, TransientStorageError
from mergeflow.fetch import fetch_model
from tasks.retries import IO_RETRIES, is_transient


def test_an_unreachable_s3_endpoint_is_transient(monkeypatch):
    monkeypatch.setenv("MERGEFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    with pytest.raises(StorageError, match="s3://models/expert: Could not connect") as raised:
        fetch_model("s3://models/expert")
    assert is_transient(raised.value)


def test_what_is_transient():
    assert is_transient(TransientStorageError("s3://b/x: connection reset"))
    assert is_transient(MlflowException("server error", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(CheckpointError("s3://b/x: no such model"))
    assert not is_transient(StorageError("s3://b/x: access denied (check the S3 credentials)"))


def test_transient_failures_are_retried_and_permanent_ones_are_not(prefect_api):
    attempts = {"transient": 0, "missing": 0}

    @task(**(IO_RETRIES | {"retry_delay_seconds": 0}))
    def flaky(kind: str) -> str:
        attempts[kind] += 1
        if kind == "transient" and attempts[kind] < 3:
            raise TransientStorageError("s3://b/x: connection reset")
        if kind == "missing":
            raise CheckpointError("s3://b/x: no such model")
        return "ok"

    @flow
    def both() -> tuple:
        return flaky("transient"), flaky("missing", return_state=True)

    value, missing = both()
    assert value == "ok" and attempts["transient"] == 3
    assert missing.is_failed() and attempts["missing"] == 1
