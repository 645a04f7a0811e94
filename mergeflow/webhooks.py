"""MLflow webhooks into mergeflow's promotion path.

A model version registered by something other than mergeflow's pipeline (the MLflow UI,
another script) is judged the same way: an MLflow webhook on `model_version.created` posts to
this relay, which checks MLflow's HMAC signature and emits the Prefect event
`mergeflow.merge.registered` that the promote deployment is triggered by. Prefect's open-source
server takes events only from its own clients, hence a relay.

- Signature: MLflow signs `f"{delivery_id}.{timestamp}.{body}"` with HMAC-SHA256 under the
  webhook's secret and sends `v1,<base64>` in X-MLflow-Signature, with X-MLflow-Delivery-Id
  and X-MLflow-Timestamp. Deliveries older than `MAX_AGE_S` are refused (replays).
- Which versions: of registered models named `mergeflow-*`, without mergeflow's model-hash tag
  (the pipeline announces its own versions itself, so none is judged twice).
- The event: resource `models:/<name>/<version>`, payload {model_name, version, source}, and
  the same id mergeflow's own announcement would have (Prefect drops a repeated id).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mergeflow.errors import MergeflowError
from mergeflow.events import MERGE_REGISTERED, emit
from mergeflow.registry import MODEL_SHA_TAG

MAX_AGE_S = 300
MODEL_PREFIX = "mergeflow-"
PATH = "/mlflow"


class WebhookError(MergeflowError):
    """A webhook delivery that must not be acted on (bad signature, stale, malformed)."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers, body: bytes, now: float | None = None) -> None:
    """Raise WebhookError unless `body` carries MLflow's valid, fresh signature under `secret`."""
    delivery_id = headers.get("X-MLflow-Delivery-Id") or ""
    timestamp = headers.get("X-MLflow-Timestamp") or ""
    signature = headers.get("X-MLflow-Signature") or ""
    if not (delivery_id and timestamp and signature):
        raise WebhookError("unsigned delivery: X-MLflow-Delivery-Id, -Timestamp and -Signature are required")
    if not timestamp.isdigit() or abs((now or time.time()) - int(timestamp)) > MAX_AGE_S:
        raise WebhookError(f"delivery timestamp {timestamp!r} is not within {MAX_AGE_S} s of now")
    if not hmac.compare_digest(sign(secret, delivery_id, timestamp, body), signature):
        raise WebhookError("signature does not match (is the relay's secret the webhook's?)")


def registered_version(body: bytes) -> dict | None:
    """The Prefect event payload for a delivery to act on, or None for one to ignore."""
    try:
        delivery = json.loads(body)
        entity, action, data = delivery["entity"], delivery["action"], delivery["data"]
    except (ValueError, KeyError, TypeError) as error:
        raise WebhookError(f"not an MLflow webhook delivery: {error}") from None
    if (entity, action) != ("model_version", "created"):
        return None
    name, version = str(data.get("name", "")), str(data.get("version", ""))
    if not name.startswith(MODEL_PREFIX) or not version.isdigit():
        return None
    if MODEL_SHA_TAG in (data.get("tags") or {}):
        return None
    return {"model_name": name, "version": int(version), "source": "mlflow-webhook"}


def announce(payload: dict, api_url: str | None = None) -> str:
    uri = f"models:/{payload['model_name']}/{payload['version']}"
    return emit(MERGE_REGISTERED, uri, payload, uri, api_url=api_url)


def relay_server(port: int, secret: str, api_url: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 (not yet serving) that relays MLflow deliveries posted to PATH."""

    class Relay(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
            self._answer(HTTPStatus.OK if self.path == "/health" else HTTPStatus.NOT_FOUND, "ok")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != PATH:
                self._answer(HTTPStatus.NOT_FOUND, f"post MLflow webhooks to {PATH}")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                verify(secret, self.headers, body)
            except WebhookError as error:
                self._answer(HTTPStatus.UNAUTHORIZED, str(error))
                return
            try:
                payload = registered_version(body)
            except WebhookError as error:
                self._answer(HTTPStatus.BAD_REQUEST, str(error))
                return
            if payload is None:
                self._answer(HTTPStatus.OK, "ignored")
                return
            try:
                event = announce(payload, api_url)
            except MergeflowError as error:  # Prefect unreachable: MLflow retries the delivery
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, str(error))
                return
            self._answer(HTTPStatus.ACCEPTED, f"{MERGE_REGISTERED} {event}")

        def _answer(self, status: HTTPStatus, text: str) -> None:
            data = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            print(f"relay: {self.address_string()} {format % args}", flush=True)

    return ThreadingHTTPServer(("127.0.0.1", port), Relay)
