"""merge: the streaming merge engine over the stored task vectors, writing the merged model and
its manifest. A destination that already holds this exact merge (same method, parameters and
input hashes, per its manifest) is reused instead of merged again."""

from __future__ import annotations

import hashlib
import json

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mergeflow.checkpoint import MANIFEST
from mergeflow.config import MergeConfig
from mergeflow.engine import merge as merge_models
from mergeflow.fetch import FetchedModel, fetch_model
from mergeflow.storage import locate
from mergeflow.task_vectors import is_complete
from tasks.retries import IO_RETRIES


def merge_key(method: str, parameters: dict, base: FetchedModel, vectors: dict[str, FetchedModel]) -> str:
    """What makes a merge this merge: method, parameters and the content of every input."""
    identity = {
        "method": method,
        "parameters": parameters,
        "base": base.sha256,
        "models": [vector.sha256 for vector in vectors.values()],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def default_destination(store: str, base_family: str, method: str, key: str) -> str:
    return f"{store.rstrip('/')}/merged/{base_family}/{method}-{key[:12]}"


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="merge-{method}")
def merge(
    base: FetchedModel,
    vectors: dict[str, FetchedModel],
    method: str,
    parameters: dict,
    destination: str,
) -> FetchedModel:
    """Merge the task vectors onto the base into `destination` (path or s3:// URI)."""
    logger = get_run_logger()
    if _holds_this_merge(destination, method, parameters, base, vectors):
        logger.info("reusing %s: it already holds this %s merge", destination, method)
        return fetch_model(destination)
    config = MergeConfig(
        merge_method=method,
        base_model=str(base.path),
        models=[{"model": str(vector.path)} for vector in vectors.values()],
        parameters=parameters,
    )
    result = merge_models(config, destination, overwrite=True)
    logger.info(
        "merged %d experts with %s into %s in %.1fs", len(vectors), method, result.output, result.seconds
    )
    return fetch_model(result.output)


def _holds_this_merge(destination, method, parameters, base, vectors) -> bool:
    if not is_complete(destination):
        return False
    manifest = json.loads(locate(destination).child(MANIFEST).read_bytes())
    inputs = manifest.get("inputs") or {}
    return (
        manifest.get("method") == method
        and (manifest.get("config") or {}).get("parameters", {}) == parameters
        and (inputs.get("base") or {}).get("sha256") == base.sha256
        and [model.get("sha256") for model in inputs.get("models", [])]
        == [v.sha256 for v in vectors.values()]
    )
