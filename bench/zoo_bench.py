"""Time a cold build of a zoo preset (issue budget: tiny ≤ 15 min on 2 CPU cores) and record the
expert-vs-base table, whether or not every expert passes the gate.

    python bench/zoo_bench.py [--preset tiny]

Builds into a fresh folder (bench/.zoo-build/<preset>), writes bench/results/zoo_build_<preset>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from machine import describe_machine, machine_line
from results_history import write_keeping_history

from mergeflow.errors import ZooError

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the models already built in bench/.zoo-build/<preset>: only those whose "
        "hyper-parameters or data changed are trained (the total is then not a cold build's)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="models trained at once, each in its own process (default: mergeflow's, one per core up to 4)",
    )
    args = parser.parse_args()
    folder = HERE / ".zoo-build" / args.preset
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    os.environ["MERGEFLOW_ZOO_DIR"] = str(folder)
    from mergeflow.zoo.build import build_preset, built_models, load_index
    from mergeflow.zoo.parallel import default_workers, threads_per_worker

    workers = args.workers or default_workers()
    threads = threads_per_worker(workers)

    machine = describe_machine()
    started = time.perf_counter()
    failure = None
    try:
        build_preset(args.preset, progress=False, workers=workers)
    except ZooError as error:
        failure = str(error)
    total = time.perf_counter() - started
    index = load_index(args.preset)
    in_preset = {
        Path(path).name
        for family in index["families"].values()
        for path in (family["base"], family["multitask"], *family["experts"].values())
    }
    models = [
        {"name": r["name"], "role": r["role"], "seconds": r.get("stats", {}).get("seconds")}
        for r in built_models()
        if Path(r["path"]).name in in_preset
    ]
    training_seconds = sum(m["seconds"] or 0 for m in models)
    rows = [row for family in index["families"].values() for row in family["table"]]
    result = {
        "preset": args.preset,
        "cold": not args.keep,
        "machine": machine,
        "workers": workers,
        "threads_per_worker": threads,
        "total_seconds": round(total, 1),
        "training_seconds": round(training_seconds, 1),
        "gate_failure": failure,
        "models": models,
        "table": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"zoo_build_{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    passed = sum(row["gain"] >= index["min_gain"] for row in rows)
    lines = [
        f"# {'Rebuild, cache kept,' if args.keep else 'Cold build'} of zoo preset `{args.preset}`",
        "",
        machine_line(machine),
        "",
        f"Total: **{total / 60:.1f} min** with {workers} worker(s) of {threads} thread(s)"
        + (" (only the models whose settings changed were trained)" if args.keep else "")
        + f"; training seconds of every model of the preset, summed: {training_seconds / 60:.1f} min; "
        f"{passed}/{len(rows)} experts beat their base by ≥ {index['min_gain']} validation accuracy.",
        "",
        "| family | task | base | expert | gain | multitask |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['family']} | {r['task']} | {r['base']:.2f} | {r['expert']:.2f} | {r['gain']:+.2f} | "
        f"{r['multitask']:.2f} |"
        for r in rows
    ]
    lines += ["", "| model | role | training seconds |", "|---|---|---|"]
    lines += [f"| {m['name']} | {m['role']} | {m['seconds']} |" for m in models]
    write_keeping_history(RESULTS / f"zoo_build_{args.preset}.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
