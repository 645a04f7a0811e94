"""Model zoos: generated ones for tests and benchmarks, trained ones (presets tiny and smol) for
the paper's experiments, and the real SmolLM2-135M-Instruct base."""

import os
from pathlib import Path

# Every zoo model folder carries this record: what it is and how it was made.
RECORD = "mergeflow-zoo.json"


def zoo_dir() -> Path:
    return Path(os.environ.get("MERGEFLOW_ZOO_DIR", Path.home() / ".cache" / "mergeflow" / "zoo"))
