"""publish_model, save_index: the steps of publish_zoo (upload a built zoo with manifests)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mergeflow.publish import publish_folder
from mergeflow.storage import locate
from tasks.retries import IO_RETRIES


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="publish-{folder.name}")
def publish_model(folder: Path, destination: str) -> str:
    uploaded = publish_folder(folder, destination)
    get_run_logger().info("%s %s", "uploaded" if uploaded else "already published:", destination)
    return destination


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="save-index")
def save_index(index: dict, uri: str) -> str:
    locate(uri).write_bytes((json.dumps(index, indent=2) + "\n").encode())
    return uri
