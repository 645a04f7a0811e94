"""A local stack for mergeflow on 127.0.0.1: SeaweedFS (S3), an MLflow server and a Prefect server.

Each runs as a background process with its log, pid file and data under
`<home>/stack/<service>/` (home: Settings.home, MERGEFLOW_HOME). `up` starts what is not
running and waits for health, `down` stops, `status` reports; `env_lines` gives the `export`
lines clients need, with the S3 keys read from their 0600 files rather than written out.
"""

from mergeflow.stack.lifecycle import (
    DEFAULT_GRACE,
    DEFAULT_TIMEOUT,
    ServiceStatus,
    down,
    env_file,
    env_lines,
    status,
    up,
)
from mergeflow.stack.processes import StackError
from mergeflow.stack.seaweed import S3Credentials, s3_client
from mergeflow.stack.services import SERVICE_NAMES, S3Service

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_TIMEOUT",
    "SERVICE_NAMES",
    "S3Credentials",
    "S3Service",
    "ServiceStatus",
    "StackError",
    "down",
    "env_file",
    "env_lines",
    "s3_client",
    "status",
    "up",
]
