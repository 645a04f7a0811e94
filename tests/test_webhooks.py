"""The MLflow webhook relay: signatures checked against MLflow's own signing code, which
deliveries it acts on, and end to end on the stack (see also test_deployments)."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature as mlflow_signature

from mergeflow.registry import MODEL_SHA_TAG
from mergeflow.webhooks import WebhookError, registered_version, sign, verify

SECRET = "relay-test-secret-0123456789"


def delivery(name: str = "mergeflow-family", version: str = "3", tags: dict | None = None, **top) -> bytes:
    body = {
        "entity": "model_version",
        "action": "created",
        "timestamp": "2026-12-01T10:00:00+00:00",
        "data": {"name": name, "version": version, "source": "runs:/r/model", "tags": tags or {}},
    }
    return json.dumps(body | top).encode()


def headers(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(timestamp if timestamp is not None else time.time()))
    return {
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": mlflow_signature(secret, "d-1", stamp, body.decode()),
    }


def test_a_delivery_signed_by_mlflow_is_accepted_and_ours_signs_the_same():
    body = delivery()
    signed = headers(body)
    verify(SECRET, signed, body)
    assert sign(SECRET, "d-1", signed["X-MLflow-Timestamp"], body) == signed["X-MLflow-Signature"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("secret", "signature does not match"),
        ("body", "signature does not match"),
        ("stale", "not within 300 s"),
        ("unsigned", "unsigned delivery"),
    ],
)
def test_a_forged_tampered_replayed_or_unsigned_delivery_is_refused(change, message):
    body = delivery()
    signed = headers(body, secret="another-secret-entirely" if change == "secret" else SECRET)
    if change == "body":
        body = delivery(version="4")
    if change == "stale":
        signed = headers(body, timestamp=time.time() - 3600)
    if change == "unsigned":
        signed.pop("X-MLflow-Signature")
    with pytest.raises(WebhookError, match=message):
        verify(SECRET, signed, body)


def test_only_new_versions_of_mergeflow_models_not_announced_by_the_pipeline_are_relayed():
    assert registered_version(delivery()) == {
        "model_name": "mergeflow-family",
        "version": 3,
        "source": "mlflow-webhook",
    }
    assert registered_version(delivery(name="someone-elses-model")) is None
    assert registered_version(delivery(tags={MODEL_SHA_TAG: "ab" * 32})) is None  # pipeline's own
    assert registered_version(delivery(action="updated")) is None
    with pytest.raises(WebhookError, match="not an MLflow webhook delivery"):
        registered_version(b'{"entity": "model_version"}')
