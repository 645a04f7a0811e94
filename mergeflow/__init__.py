"""mergeflow: merge fine-tuned expert models into one, evaluate it and register it."""

import os

# torch and numba each bring an OpenMP thread pool. With the default (active) wait policy the
# idle pool spins while the other works, and a merge alternating between them runs up to 3x
# slower on two cores. Must be set before either library starts its pool; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
