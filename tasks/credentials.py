"""load_credentials: the first step of every flow. Credentials come from the environment or,
for each one the environment lacks, from a Prefect Secret block of a fixed name, so a worker
needs no secrets in its own environment. Nowhere else: mergeflow never reads a credentials
file of its own, and never logs a value.

    Environment variable       Secret block
    AWS_ACCESS_KEY_ID          mergeflow-aws-access-key-id
    AWS_SECRET_ACCESS_KEY      mergeflow-aws-secret-access-key
    MLFLOW_TRACKING_USERNAME   mergeflow-mlflow-tracking-username
    MLFLOW_TRACKING_PASSWORD   mergeflow-mlflow-tracking-password
    MLFLOW_TRACKING_TOKEN      mergeflow-mlflow-tracking-token
"""

from __future__ import annotations

import os

from prefect import task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def secret_block_name(variable: str) -> str:
    return "mergeflow-" + variable.lower().replace("_", "-")


@task(cache_policy=NO_CACHE, task_run_name="load-credentials")
def load_credentials() -> list[str]:
    """Fill the credentials the environment lacks from Secret blocks (this process only, which
    the flow's tasks and local Dask workers share); returns the names filled, never values."""
    filled = []
    for variable in CREDENTIALS:
        if os.environ.get(variable):
            continue
        try:
            value = Secret.load(secret_block_name(variable)).get()
        except ValueError:  # no such block: this credential is not needed or comes from elsewhere
            continue
        os.environ[variable] = str(value)
        filled.append(variable)
    if filled:
        get_run_logger().info("credentials from Secret blocks: %s", ", ".join(filled))
    return filled
