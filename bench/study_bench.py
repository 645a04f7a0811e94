"""Speed-up of the study on Dask: the same grid with 1 and with 2 local workers (one thread
each), side by side in one run, each from an empty cache (own artifact store, score cache and
study name), on a built zoo preset. Writes bench/results/study_bench.{json,md}.

    .venv/bin/python bench/study_bench.py --preset demo
    .venv/bin/python bench/study_bench.py --preset demo --methods all
    .venv/bin/python bench/study_bench.py --preset tiny --quick        # the quick grid, 4 families
    .venv/bin/python bench/study_bench.py --preset tiny --paper-grid   # the ≤ 60 min budget
    .venv/bin/python bench/study_bench.py --preset tiny --paper-grid --workers 1,2  # its speed-up

With --paper-grid, the run's report, plots and results.parquet are kept in
bench/results/study_<preset>_paper/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine, machine_line
from results_history import write_keeping_history

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
    log = scratch / f"log-{workers}.txt"
    started = time.perf_counter()
    with open(log, "w") as out:
        finished = subprocess.run(
            [sys.executable, "-m", "flows.study", str(path)],
            env=env,
            cwd=Path(__file__).parent.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if finished.returncode != 0:
        raise SystemExit(f"the study with {workers} workers failed; its log ends:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="demo")
    parser.add_argument(
        "--methods",
        default="average,task_arithmetic,ties,dare_ties",
        help="comma-separated, or 'all' registered methods: more cells over the fixed start-up and report",
    )
    parser.add_argument(
        "--paper-grid",
        action="store_true",
        help="time the study's default grid (the paper's: 1, 2, 4, 8 experts, 3 seeds) once per "
        "--workers count, instead of comparing 1 and 2 workers on a small grid",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="compare 1 and 2 workers on the study's --quick grid (2 methods, 1-2 experts, 2 seeds)",
    )
    parser.add_argument(
        "--workers", default="2", help="comma-separated worker counts of the --paper-grid runs, e.g. 1,2"
    )
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    if args.paper_grid:
        time_paper_grid(args.preset, [int(w) for w in args.workers.split(",")], methods)
        return
    if args.quick:
        from flows.study import QUICK

        grid = QUICK.model_dump(exclude={"families"})
    else:
        grid = {"expert_counts": [1, 2], "methods": methods, "seeds": [0, 1, 2]}
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as scratch:
        seconds = {workers: run(args.preset, workers, grid, Path(scratch)) for workers in (1, 2)}
    speedup = seconds[1] / seconds[2]
    result = {"preset": args.preset, "grid": grid, "machine": machine, "seconds": seconds, "speedup": speedup}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "study_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    write_keeping_history(
        RESULTS / "study_bench.md",
        f"# Study on Dask: 2 workers vs 1 (preset `{args.preset}`)\n\n{machine_line(machine)}\n\n"
        f"Grid: {json.dumps(grid)}; each run from an empty cache, one thread per worker.\n\n"
        "| workers | seconds |\n|---|---|\n"
        + "".join(f"| {w} | {s:.1f} |\n" for w, s in seconds.items())
        + f"\nSpeed-up of 2 workers over 1: **{speedup:.2f}×** (target ≥ 1.7×).\n",
    )
    print(json.dumps(result, indent=2))


def time_paper_grid(preset: str, worker_counts: list[int], methods: list[str]) -> None:
    """The study's default grid once per worker count, each from an empty cache; the report of
    the last run is kept."""
    from mergeflow.study import StudyGrid, enumerate_cells
    from mergeflow.zoo.build import load_index

    grid = StudyGrid(methods=methods)
    cells = len(enumerate_cells(load_index(preset), grid))
    kept = RESULTS / f"study_{preset}_paper"
    machine = describe_machine()
    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for workers in worker_counts:
            seconds[workers] = run(preset, workers, grid.model_dump(), Path(scratch))
        # The last run's report and results table outlive the scratch folder; a README there is kept.
        last = worker_counts[-1]
        kept.mkdir(parents=True, exist_ok=True)
        for file in Path(scratch, f"report-{last}").iterdir():
            shutil.copy2(file, kept / file.name)
        for table in Path(scratch, f"artifacts-{last}").glob("studies/*/results.parquet"):
            shutil.copy2(table, kept / "results.parquet")
    speedup = seconds[1] / seconds[2] if {1, 2} <= seconds.keys() else None
    result = {
        "preset": preset,
        "grid": grid.model_dump(),
        "cells": cells,
        "machine": machine,
        "seconds": seconds,
        "speedup": speedup,
    }
    name = f"study_grid_{preset}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# The paper's grid on zoo preset `{preset}`",
        "",
        machine_line(machine),
        "",
        f"Grid: {json.dumps(grid.model_dump())}: **{cells} cells**, each run from an empty cache, "
        "Dask workers of one thread. Budget in issue 7: 60 min for tiny.",
        "",
        "| workers | wall time |",
        "|---|---|",
        *(f"| {w} | **{s / 60:.1f} min** ({s:.0f} s) |" for w, s in seconds.items()),
    ]
    if speedup is not None:
        lines += ["", f"Speed-up of 2 workers over 1: **{speedup:.2f}×** (target ≥ 1.7×)."]
    write_keeping_history(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
