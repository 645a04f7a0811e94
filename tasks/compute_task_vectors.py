"""compute_task_vectors: τ = expert − base for every expert, stored once per (base, expert) pair
under the artifact store and reused by every later merge of that pair."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mergeflow.fetch import FetchedModel, fetch_model
from mergeflow.task_vectors import ensure_task_vector
from tasks.retries import IO_RETRIES


# No Prefect cache: the store is content-addressed already, and a cached local path could
# outlive the cache folder it points into.
@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="compute-task-vectors")
def compute_task_vectors(
    base: FetchedModel, experts: dict[str, FetchedModel], store: str
) -> dict[str, FetchedModel]:
    """Task name → its expert's task vector (fetched and verified); computed only when absent."""
    logger = get_run_logger()
    vectors = {}
    for name, expert in experts.items():
        vector = ensure_task_vector(str(base.path), str(expert.path), store)
        logger.info(
            "task vector for %s: %s (%s)", name, vector.uri, "computed" if vector.computed else "reused"
        )
        vectors[name] = fetch_model(vector.uri)
    return vectors
