"""merge_on_landing: what a `mergeflow.expert.landed` event starts (deployment trigger in
deployments/prefect.yaml): merge the latest expert per task of the base with the policy's
methods, each registered in MLflow, where it becomes the `challenger`; then the event
`mergeflow.merge.registered`, on which the promote deployment judges the challenger.

Exactly once per expert set: a run whose set of latest experts is already merged (or being
merged) ends at once; otherwise it waits a short settling time (so a burst of landings is one
merge), looks the set up again, claims it and merges.
The deployment runs one at a time (concurrency limit 1, later runs queue), so two runs never
decide on the same set at once.
"""

from __future__ import annotations

import time

from prefect import flow
from pydantic import BaseModel, Field

from flows.merge_and_evaluate import MergeRequest, merge_and_evaluate
from mergeflow.experts import base_uri
from mergeflow.merges import PAPER_METHODS
from mergeflow.settings import load_settings
from tasks.credentials import load_credentials
from tasks.landing import (
    announce_registered,
    claim_uri,
    find_latest_experts,
    read_claim,
    set_key,
    write_claim,
)


class LandingPolicy(BaseModel):
    base: str = Field(description="Base family whose experts landed (the event's payload.base)")
    methods: list[str] = Field(
        default_factory=lambda: list(PAPER_METHODS), description="Paper methods to merge with"
    )
    settle_seconds: float = Field(20.0, ge=0, description="Wait this long for more landings first")
    stale_after_hours: float = Field(
        6.0, gt=0, description="A merge still 'running' after this long is taken as crashed and redone"
    )
    artifacts: str | None = Field(None, description="Artifact store; default from mergeflow settings")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default from mergeflow settings")


def redo(claim: dict, stale_after_hours: float) -> bool:
    """A failed merge is redone, and so is one 'running' for so long its run must have died."""
    if claim["status"] == "failed":
        return True
    return (
        claim["status"] == "running" and time.time() - claim.get("started_at", 0) > stale_after_hours * 3600
    )


def skip_if_merged(policy: LandingPolicy, store: str, experts: dict | None = None) -> dict | None:
    """The run's result when the current set of latest experts needs no merge, else None."""
    experts = experts if experts is not None else find_latest_experts(policy.base, store)
    if not experts:
        return None
    key = set_key(experts, policy.methods)
    previous = read_claim(claim_uri(store, policy.base, key))
    if previous is None or redo(previous, policy.stale_after_hours):
        return None
    print(f"expert set {key[:16]} of {policy.base} was already merged ({previous['status']}); skipping")
    return {"merged": False, "reason": "already merged", "key": key}


@flow(name="merge-on-landing", log_prints=True)
def merge_on_landing(policy: LandingPolicy) -> dict:
    load_credentials()
    unknown = sorted(set(policy.methods) - set(PAPER_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(PAPER_METHODS)}")
    store = policy.artifacts or load_settings().artifacts
    # A burst's later runs find its set merged (or being merged) already and end at once,
    # instead of each waiting out the settling time first.
    skipped = skip_if_merged(policy, store)
    if skipped:
        return skipped
    time.sleep(policy.settle_seconds)
    experts = find_latest_experts(policy.base, store)
    if not experts:
        return {"merged": False, "reason": f"no experts of {policy.base} in {store}"}
    skipped = skip_if_merged(policy, store, experts)
    if skipped:
        return skipped
    key = set_key(experts, policy.methods)
    claim = claim_uri(store, policy.base, key)
    record = {
        "base": policy.base,
        "experts": {t: e.ref for t, e in experts.items()},
        "methods": policy.methods,
        "started_at": time.time(),
    }
    write_claim(claim, "running", record)
    versions = {}
    try:
        for method in policy.methods:
            parameters, grid = PAPER_METHODS[method]
            outcome = merge_and_evaluate(
                MergeRequest(
                    base=base_uri(store, policy.base),
                    base_family=policy.base,
                    experts=record["experts"],
                    method=method,
                    parameters=parameters,
                    grid=grid,
                    artifacts=store,
                    tracking_uri=policy.tracking_uri,
                )
            )
            versions[method] = outcome.model_version
    except BaseException:
        write_claim(claim, "failed", record)
        raise
    write_claim(claim, "done", record | {"versions": versions})
    announce_registered(f"mergeflow-{policy.base}", versions)
    return {"merged": True, "key": key, "versions": versions}
