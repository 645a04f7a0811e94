"""Load: 20 expert landings in a burst on the real stack (servers, `prefect deploy`, a process
worker), through tests/reliability/test_load.py, which asserts the burst is coalesced and
every merge completes, and measures the time until every run is final and the peak summed RSS
of every process the test started. Writes bench/results/landing_load.{json,md}.

    .venv/bin/python bench/landing_load.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "landing_load.json"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "slow", "tests/reliability/test_load.py"],
        env=os.environ | {"MERGEFLOW_BENCH_OUT": str(out)},
        cwd=ROOT,
        check=True,
    )
    measured = json.loads(out.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines = [
        "# 20 expert landings in a burst",
        "",
        "`.venv/bin/python bench/landing_load.py` (runs `tests/reliability/test_load.py`)",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}; git {commit.stdout.strip()}.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in measured.items()],
    ]
    (RESULTS / "landing_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
