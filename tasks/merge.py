"""merge: the streaming merge engine over the stored task vectors, writing the merged model and
its manifest. A destination that already holds this exact merge (same method, parameters and
input hashes, per its manifest) is reused instead of merged again (mergeflow.merges)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mergeflow.fetch import FetchedModel, fetch_model
from mergeflow.merges import merge_or_reuse
from tasks.retries import IO_RETRIES


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="merge-{method}")
def merge(
    base: FetchedModel,
    vectors: dict[str, FetchedModel],
    method: str,
    parameters: dict,
    destination: str,
) -> FetchedModel:
    """Merge the task vectors onto the base into `destination` (path or s3:// URI)."""
    models = [(str(vector.path), vector.sha256) for vector in vectors.values()]
    merged = merge_or_reuse(method, parameters, (str(base.path), base.sha256), models, destination)
    get_run_logger().info(
        "%s %d experts with %s into %s",
        "merged" if merged else "reused a merge of",
        len(vectors),
        method,
        destination,
    )
    return fetch_model(destination)
