"""Prefect flows; each only composes tasks."""

import os

# With no API configured, a flow starts Prefect's temporary server, which sends usage telemetry
# and, offline, logs an ERROR when it cannot (in the middle of `./dev demo`). The stack's server
# runs with telemetry off too (mergeflow/stack/services.py). A user's own value wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
