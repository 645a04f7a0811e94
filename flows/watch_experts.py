"""watch_experts: announce experts that other tools uploaded (deployments/prefect.yaml runs it
on an interval). Each complete expert under <artifacts>/experts/ gets one
`mergeflow.expert.landed` event; `mergeflow expert publish` announces its own uploads."""

from __future__ import annotations

from prefect import flow

from mergeflow.settings import load_settings
from tasks.credentials import load_credentials
from tasks.landing import announce_new_experts


@flow(name="watch-experts", log_prints=True)
def watch_experts(artifacts: str | None = None) -> list[str]:
    load_credentials()
    return announce_new_experts(artifacts or load_settings().artifacts)
