"""fetch_experts: resolve the base and expert references to verified local folders."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from mergeflow.fetch import FetchedModel, fetch_model


@task(retries=2, retry_delay_seconds=[2, 10], task_run_name="fetch-experts")
def fetch_experts(base: str, experts: dict[str, str]) -> tuple[FetchedModel, dict[str, FetchedModel]]:
    """`experts` maps each held-in task to its expert's reference. A missing or corrupt model
    fails the task (and the flow) with a message naming it."""
    logger = get_run_logger()
    fetched_base = fetch_model(base)
    fetched = {}
    for task_name, ref in experts.items():
        fetched[task_name] = fetch_model(ref)
        logger.info("expert for %s: %s (sha256 %s)", task_name, ref, fetched[task_name].sha256[:12])
    return fetched_base, fetched
