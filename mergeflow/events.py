"""Prefect events from plain code: `emit` posts to the Prefect server's REST API (POST
/api/events), so the library and the CLI announce things without importing Prefect.

Events need a Prefect server (PREFECT_API_URL): automations and deployment triggers only run
there, not on the ephemeral API.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

from mergeflow.errors import MergeflowError
from mergeflow.settings import load_settings

EXPERT_LANDED = "mergeflow.expert.landed"
MERGE_REGISTERED = "mergeflow.merge.registered"


class EventError(MergeflowError):
    """An event could not be delivered to the Prefect server."""


def event_id(resource_id: str, version: str) -> str:
    """The same landing always has the same id, so a repeated announcement is recognisable."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{resource_id}#{version}"))


def emit(event: str, resource_id: str, payload: dict, version: str, api_url: str | None = None) -> str:
    """Send one event about `resource_id`; returns its id. `version` (e.g. a content hash) makes
    the id: the same (resource, version) is the same event."""
    api = api_url or load_settings().prefect_api_url
    if not api:
        raise EventError(
            f"cannot emit {event}: no Prefect server (set PREFECT_API_URL, e.g. from `mergeflow stack up`)"
        )
    identifier = event_id(resource_id, version)
    body = [
        {
            "id": identifier,
            "occurred": datetime.now(UTC).isoformat(),
            "event": event,
            "resource": {"prefect.resource.id": resource_id, "prefect.resource.name": resource_id},
            "payload": payload,
        }
    ]
    request = urllib.request.Request(
        f"{api.rstrip('/')}/events",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(request, timeout=30) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        raise EventError(f"cannot emit {event} to {api}: {error}") from None
    return identifier
