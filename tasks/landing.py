"""The steps of event-driven merging: find the latest expert per task of a base, keep the
record of which expert sets were merged, announce newly landed experts."""

from __future__ import annotations

import hashlib
import json

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mergeflow.events import EXPERT_LANDED, MERGE_REGISTERED, emit
from mergeflow.experts import (
    ExpertVersion,
    base_uri,
    latest_per_task,
    list_experts,
    read_announced,
    write_announced,
)
from mergeflow.settings import load_settings
from mergeflow.storage import locate
from tasks.retries import IO_RETRIES


def set_key(experts: dict[str, ExpertVersion], methods: list[str]) -> str:
    """Identity of one merge job: which expert (by content) per task, and which methods."""
    identity = {"experts": {task: e.sha256 for task, e in experts.items()}, "methods": sorted(methods)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def claim_uri(store: str, base: str, key: str) -> str:
    return f"{store.rstrip('/')}/landings/{base}/{key[:16]}.json"


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="find-latest-experts-{base}")
def find_latest_experts(base: str, store: str) -> dict[str, ExpertVersion]:
    return latest_per_task(list_experts(store, base))


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="read-claim")
def read_claim(uri: str) -> dict | None:
    location = locate(uri)
    return json.loads(location.read_bytes()) if location.exists() else None


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="write-claim-{status}")
def write_claim(uri: str, status: str, record: dict) -> None:
    locate(uri).write_bytes(json.dumps(record | {"status": status}, indent=2).encode())


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="announce-new-experts")
def announce_new_experts(store: str) -> list[str]:
    """Emit `mergeflow.expert.landed` for every complete expert not announced before; returns
    their URIs. The record is written after the events, so a crash repeats an announcement
    rather than losing one (a repeated set is never merged twice)."""
    announced = read_announced(store)
    new = [e for e in list_experts(store) if f"{e.uri}#{e.sha256}" not in announced]
    for expert in new:
        emit(EXPERT_LANDED, expert.uri, expert.payload(base_uri(store, expert.base)), expert.sha256)
        get_run_logger().info("announced %s (%s for %s)", expert.uri, expert.task, expert.base)
    if new:
        write_announced(store, announced | {f"{e.uri}#{e.sha256}" for e in new})
    return [e.uri for e in new]


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="announce-registered")
def announce_registered(model_name: str, versions: dict[str, str | None]) -> None:
    """`mergeflow.merge.registered` for the newest version, so promotion can follow. Only a
    Prefect server acts on events; on the ephemeral API there is nothing to tell."""
    numbers = sorted({int(v) for v in versions.values() if v})
    if not numbers or not load_settings().prefect_api_url:
        return
    uri = f"models:/{model_name}/{numbers[-1]}"
    emit(MERGE_REGISTERED, uri, {"model_name": model_name, "version": numbers[-1]}, uri)
