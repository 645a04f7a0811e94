"""compare_with_champion, apply_promotion: the steps of the promote flow (mergeflow.promotion)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeflow.promotion import Decision, Gates, apply, decide
from tasks.retries import IO_RETRIES


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="compare-{challenger}-with-champion")
def compare_with_champion(
    model_name: str, challenger: str, gates: Gates, tracking_uri: str | None = None
) -> Decision:
    return decide(model_name, gates, challenger, tracking_uri)


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="apply-promotion")
def apply_promotion(decision: Decision, tracking_uri: str | None = None) -> Decision:
    return apply(decision, tracking_uri)
