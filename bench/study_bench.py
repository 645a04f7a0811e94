"""Speed-up of the study on Dask: the same grid with 1 and with 2 local workers (one thread
each), side by side in one run, each from an empty cache (own artifact store, score cache and
study name), on a built zoo preset. Writes bench/results/study_bench.{json,md}.

    .venv/bin/python bench/study_bench.py --preset demo
    .venv/bin/python bench/study_bench.py --preset demo --methods all
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergeflow.methods import METHODS

RESULTS = Path(__file__).parent / "results"


def run(preset: str, workers: int, grid: dict, scratch: Path) -> float:
    request = {
        "name": f"bench-{workers}w-{int(time.time())}",
        "preset": preset,
        "grid": grid,
        "workers": workers,
        "artifacts": str(scratch / f"artifacts-{workers}"),
        "report_dir": str(scratch / f"report-{workers}"),
        "tracking_uri": f"sqlite:///{scratch / f'mlflow-{workers}.db'}",
    }
    path = scratch / f"request-{workers}.json"
    path.write_text(json.dumps(request))
    env = os.environ | {"MERGEFLOW_CACHE_DIR": str(scratch / f"cache-{workers}")}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.study", str(path)],
        env=env,
        check=True,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="demo")
    parser.add_argument(
        "--methods",
        default="average,task_arithmetic,ties,dare_ties",
        help="comma-separated, or 'all' registered methods: more cells over the fixed start-up and report",
    )
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    grid = {"expert_counts": [1, 2], "methods": methods, "seeds": [0, 1, 2]}
    with tempfile.TemporaryDirectory() as scratch:
        seconds = {workers: run(args.preset, workers, grid, Path(scratch)) for workers in (1, 2)}
    speedup = seconds[1] / seconds[2]
    result = {"preset": args.preset, "grid": grid, "seconds": seconds, "speedup": speedup}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "study_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "study_bench.md").write_text(
        f"# Study on Dask: 2 workers vs 1 (preset `{args.preset}`)\n\n"
        f"Grid: {json.dumps(grid)}; each run from an empty cache, one thread per worker.\n\n"
        "| workers | seconds |\n|---|---|\n"
        + "".join(f"| {w} | {s:.1f} |\n" for w, s in seconds.items())
        + f"\nSpeed-up of 2 workers over 1: **{speedup:.2f}×** (target ≥ 1.7×).\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
