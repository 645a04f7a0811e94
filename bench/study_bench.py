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
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from machine import describe_machine, machine_line
from results_history import write_keeping_history

from mergeflow.methods import METHODS

RESULTS = Path(__file__).parent / "results"


def run(preset: str, workers: int, grid: dict, scratch: Path) -> dict:
    """One study run from an empty cache: wall seconds and CPU seconds by process role."""
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
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.study", str(path)],
            env=env,
            cwd=Path(__file__).parent.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    cpu = cpu_by_role(process)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"the study with {workers} workers failed; its log ends:\n{log.read_text()[-3000:]}")
    busy = cpu.get(ROLE_WORKER, 0.0) / (workers * seconds)
    return {"seconds": seconds, "cpu_seconds": cpu, "workers_busy": round(busy, 3)}


ROLE_FLOW = "flow process (with the Dask scheduler)"
ROLE_API = "Prefect API server"
ROLE_WORKER = "Dask workers"


def _role(process: psutil.Process, root: psutil.Process) -> str:
    if process.pid == root.pid:
        return ROLE_FLOW
    command = " ".join(process.cmdline())
    if "uvicorn" in command:
        return ROLE_API
    if "--multiprocessing-fork" in command:
        return ROLE_WORKER
    return "other"


def cpu_by_role(process: subprocess.Popen, every: float = 0.5) -> dict[str, float]:
    """CPU seconds (user + system) of the process tree of `process` by role, until it exits.
    Sampled every `every` seconds: what a process uses in its last half second goes uncounted."""
    root = psutil.Process(process.pid)
    last: dict[int, tuple[str, float]] = {}
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            for member in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = member.cpu_times()
                    role = last[member.pid][0] if member.pid in last else _role(member, root)
                    last[member.pid] = (role, times.user + times.system)
        time.sleep(every)
    totals: dict[str, float] = {}
    for role, seconds in last.values():
        totals[role] = round(totals.get(role, 0.0) + seconds, 1)
    return totals


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
        runs = {workers: run(args.preset, workers, grid, Path(scratch)) for workers in (1, 2)}
    seconds = {workers: measured["seconds"] for workers, measured in runs.items()}
    speedup = seconds[1] / seconds[2]
    result = {"preset": args.preset, "grid": grid, "machine": machine, "runs": runs, "speedup": speedup}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "study_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    write_keeping_history(
        RESULTS / "study_bench.md",
        f"# Study on Dask: 2 workers vs 1 (preset `{args.preset}`)\n\n{machine_line(machine)}\n\n"
        f"Grid: {json.dumps(grid)}; each run from an empty cache, one thread per worker.\n\n"
        + "\n".join(runs_table(runs, lambda s: f"{s:.1f} s"))
        + f"\n\nSpeed-up of 2 workers over 1: **{speedup:.2f}×** (target ≥ 1.7×).\n",
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
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for workers in worker_counts:
            runs[workers] = run(preset, workers, grid.model_dump(), Path(scratch))
        # The last run's report and results table outlive the scratch folder; a README there is kept.
        last = worker_counts[-1]
        kept.mkdir(parents=True, exist_ok=True)
        for file in Path(scratch, f"report-{last}").iterdir():
            shutil.copy2(file, kept / file.name)
        for table in Path(scratch, f"artifacts-{last}").glob("studies/*/results.parquet"):
            shutil.copy2(table, kept / "results.parquet")
    seconds = {workers: measured["seconds"] for workers, measured in runs.items()}
    speedup = seconds[1] / seconds[2] if {1, 2} <= seconds.keys() else None
    result = {
        "preset": preset,
        "grid": grid.model_dump(),
        "cells": cells,
        "machine": machine,
        "runs": runs,
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
        *runs_table(runs, lambda s: f"**{s / 60:.1f} min** ({s:.0f} s)"),
    ]
    if speedup is not None:
        lines += ["", f"Speed-up of 2 workers over 1: **{speedup:.2f}×** (target ≥ 1.7×)."]
    write_keeping_history(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


def runs_table(runs: dict[int, dict], wall) -> list[str]:
    """Markdown rows: wall time, then CPU seconds by process role and how busy the workers were
    (their CPU time over workers x wall time): the split shows what does not divide over workers."""
    roles = [ROLE_WORKER, ROLE_FLOW, ROLE_API]
    lines = [
        "| workers | wall time | " + " | ".join(f"CPU s: {role}" for role in roles) + " | workers busy |",
        "|---|---|" + "---|" * (len(roles) + 1),
    ]
    for workers, measured in runs.items():
        cpu = measured["cpu_seconds"]
        cells = " | ".join(f"{cpu.get(role, 0.0):.0f}" for role in roles)
        busy = measured["workers_busy"]
        lines.append(f"| {workers} | {wall(measured['seconds'])} | {cells} | {busy:.0%} |")
    return lines


if __name__ == "__main__":
    main()
