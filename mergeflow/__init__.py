"""mergeflow: merge fine-tuned expert models into one, evaluate it and register it."""

import os

# torch and numba each bring an OpenMP thread pool (two copies of libgomp on Linux). An idle
# pool spins before it sleeps; spinning for libgomp's default 300,000 rounds against the other
# pool made merges up to 3x slower on the first 2-core machines. Not spinning at all makes every
# torch operation wake its threads from sleep: training the zoo's small models ran 1.6-1.9x
# slower per step (5M: 203 vs 120 ms, 2M: 98 vs 52). A short spin suits training; the
# `mergeflow merge` command spins none (MERGE_SPIN_COUNT). libgomp honours the spin count under
# the passive policy; other OpenMP runtimes only read the policy. Must be set before either
# library starts its pool; a user's value wins. A child process inherits the value we set:
# MERGEFLOW_SET_GOMP_SPINCOUNT marks it as ours, or a `mergeflow merge` started by a process that
# imported mergeflow (the merge bench, a flow) took the training spin for the user's and spun
# (dare_ties with 8 experts: 2.9 s against 2.1).
TRAINING_SPIN_COUNT = "100000"
MERGE_SPIN_COUNT = "0"
_SPIN_COUNT_WE_SET = "MERGEFLOW_SET_GOMP_SPINCOUNT"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SPIN_COUNT_FROM_USER = os.environ.get("GOMP_SPINCOUNT") not in (None, os.environ.get(_SPIN_COUNT_WE_SET))


def set_spin_count(count: str) -> None:
    """Set libgomp's spin count for this process and its children, unless the user set one."""
    if not SPIN_COUNT_FROM_USER:
        os.environ["GOMP_SPINCOUNT"] = os.environ[_SPIN_COUNT_WE_SET] = count


set_spin_count(TRAINING_SPIN_COUNT)

__all__ = ["MergeConfig", "MergeResult", "MergeflowError", "load_config", "merge"]
__version__ = "0.1.0"

# Imported on first use: these pull in torch (~4 s), which commands like `mergeflow stack status`
# never need.
_EXPORTS = {
    "MergeConfig": "mergeflow.config",
    "load_config": "mergeflow.config",
    "MergeResult": "mergeflow.engine",
    "merge": "mergeflow.engine",
    "MergeflowError": "mergeflow.errors",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergeflow' has no attribute {name!r}")
