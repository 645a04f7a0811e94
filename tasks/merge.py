"""merge: the streaming merge engine, writing the merged model and its manifest."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from mergeflow.config import MergeConfig
from mergeflow.engine import merge as merge_models
from mergeflow.fetch import FetchedModel


@task(retries=1, retry_delay_seconds=5, task_run_name="merge-{method}")
def merge(
    base: FetchedModel, experts: dict[str, FetchedModel], method: str, parameters: dict, destination: str
) -> str:
    """Merge the experts onto the base into `destination` (path or s3:// URI); returns it."""
    config = MergeConfig(
        merge_method=method,
        base_model=str(base.path),
        models=[{"model": str(expert.path)} for expert in experts.values()],
        parameters=parameters,
    )
    result = merge_models(config, destination, overwrite=True)
    get_run_logger().info(
        "merged %d experts with %s into %s in %.1fs", len(experts), method, result.output, result.seconds
    )
    return result.output
