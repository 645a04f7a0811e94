"""Time one evaluation of SmolLM2-135M-Instruct on every task's test split (issue budget: 2 min).

    python bench/eval_bench.py [--threads N]

Writes bench/results/eval_bench.{md,json}: seconds and accuracy per task, tokens scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import describe_machine, machine_line
from results_history import write_keeping_history

from mergeflow.eval.harness import load_model
from mergeflow.eval.scoring import accuracy, encode_many
from mergeflow.eval.tasks import TASKS, load_task
from mergeflow.zoo.smollm2 import smollm2_base

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    model, tokenizer = load_model(smollm2_base())
    rows, started = [], time.perf_counter()
    for name in TASKS:
        test = load_task(name)["test"]
        tokens = sum(map(len, encode_many(tokenizer, test["prompt"])))
        t0 = time.perf_counter()
        value = accuracy(model, tokenizer, test)
        rows.append(
            {
                "task": name,
                "kind": TASKS[name].kind,
                "examples": len(test),
                "prompt_tokens": tokens,
                "accuracy": round(value, 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(rows[-1], flush=True)
    total = time.perf_counter() - started
    result = {
        "model": "smollm2-135m-instruct (Q4_1 dequantised)",
        "threads": args.threads,
        "machine": machine,
        "total_seconds": round(total, 1),
        "tasks": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Evaluating SmolLM2-135M-Instruct on all tasks ({args.threads} threads)",
        "",
        machine_line(machine),
        "",
        f"Total: **{total:.0f} s** for {sum(r['examples'] for r in rows)} test examples "
        f"({sum(r['prompt_tokens'] for r in rows)} prompt tokens). Budget in issue 4: 120 s.",
        "",
        "| task | kind | examples | prompt tokens | accuracy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['task']} | {r['kind']} | {r['examples']} | {r['prompt_tokens']} | {r['accuracy']:.3f} | "
        f"{r['seconds']} |"
        for r in rows
    ]
    write_keeping_history(RESULTS / "eval_bench.md", "\n".join(lines) + "\n")
    print(f"total {total:.1f} s")


if __name__ == "__main__":
    main()
