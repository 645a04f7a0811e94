"""Build a zoo preset's models in worker processes, several at a time.

Models of a few million parameters use two cores better as two one-thread trainings than as one
two-thread training: on 2 cores of an AMD EPYC a 5M expert trains 1.5-1.6x slower on one thread
(its small products barely split), so two side by side do ~1.3x the work; the tiny preset built
cold in 13.7-14.5 min with two workers against ~17.6 min in one process (bench/results/zoo_build_tiny.md).
Float32 pre-training splits well (1.9x slower on one thread) and SmolLM2-135M experts gain ~1.05x.
The trained weights are bit-identical whatever the thread count (tests/test_zoo_parallel.py), so a
model's cache key does not depend on how it was built.

Each worker runs the same `Builder` methods a serial build runs, one model per step. A step
starts once the base it starts from is built: pre-training first, then the IT sibling, then the
experts, multitask model and base scores of each family. Among the steps ready to run, bases go
first (every later model waits on them), then the longest trainings, so that the workers finish
together.
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from mergeflow.errors import ZooError
from mergeflow.zoo import zoo_dir
from mergeflow.zoo.build import Builder, family_name
from mergeflow.zoo.model_cache import remove_abandoned_stages
from mergeflow.zoo.presets import LlamaSize, Preset

# Rough work of one training step on a real ~135M base, in units of hidden_size^2 * layers.
REAL_BASE_WEIGHT = 576.0**2 * 30


def default_workers() -> int:
    """One worker per core on the CPU, at most 4 (each holds its own copy of torch and data); one
    on a GPU, which the trainings would only take turns on. Cores are torch's thread count, as
    the merge engine counts them (OMP_NUM_THREADS or the physical cores)."""
    if torch.cuda.is_available():
        return 1
    return min(torch.get_num_threads(), 4)


def threads_per_worker(workers: int) -> int:
    """Each worker's share of the cores while all of them train."""
    return max(1, torch.get_num_threads() // workers)


@dataclass(frozen=True)
class Step:
    kind: Literal["pt", "it", "fine_tune", "base_accuracy"]
    size: LlamaSize | None = None
    family: str = ""
    base: str = ""  # folder of the base a fine-tune or score starts from
    base_key: str = ""
    task: str | None = None  # None: the multitask model
    cost: float = 0.0  # estimated work, for ordering only

    @property
    def label(self) -> str:
        if self.kind in ("pt", "it"):
            return f"{self.kind} {self.size.name}"
        if self.kind == "base_accuracy":
            return f"{self.family} base scores"
        return f"{self.family} {self.task or 'multitask'}"


def run_step(builder: Builder, step: Step) -> tuple[tuple[Path, str] | None, list[str], float]:
    """Run one step (in a worker); returns (folder and key for a base step, the folders it built,
    seconds)."""
    builder.built.clear()
    started = time.perf_counter()
    base = None
    if step.kind == "pt":
        base = builder.pretrained(step.size)
    elif step.kind == "it":
        base = builder.instruction_tuned(step.size)
    elif step.kind == "fine_tune":
        builder.fine_tuned(Path(step.base), step.base_key, step.family, step.task)
    else:
        builder.base_accuracy(Path(step.base))
    return base, list(builder.built), time.perf_counter() - started


def _family_steps(
    preset: Preset, tasks: list[str], family: str, base: Path, key: str, weight: float
) -> list[Step]:
    """A family's steps once its base is built: its scores, an expert per task, the multitask model."""
    steps = [Step("base_accuracy", family=family, base=str(base), base_key=key)]
    for task in [*tasks, None]:
        spec = preset.expert_spec(task) if task else preset.multitask
        cost = spec.steps * weight
        steps.append(Step("fine_tune", family=family, base=str(base), base_key=key, task=task, cost=cost))
    return steps


def _weight(size: LlamaSize) -> float:
    return float(size.hidden_size**2 * size.num_layers)


class Worker:
    """A `python -m mergeflow.zoo.worker` process: one step at a time, its answers read by a
    thread into the shared queue as (worker, answer)."""

    def __init__(self, preset: Preset, answers: queue.Queue):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mergeflow.zoo.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "MERGEFLOW_ZOO_DIR": str(zoo_dir())},
        )
        self.step: Step | None = None
        self._send(preset)
        threading.Thread(target=self._read, args=(answers,), daemon=True).start()

    def start(self, step: Step, threads: int) -> None:
        self.step = step
        self._send((step, threads))

    def _send(self, message) -> None:
        try:
            pickle.dump(message, self.process.stdin)
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the process ended; its reader reports that

    def _read(self, answers: queue.Queue) -> None:
        while True:
            try:
                answers.put((self, pickle.load(self.process.stdout)))
            except (EOFError, OSError):
                answers.put((self, None))  # the process ended
                return

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _next_answer(answers: queue.Queue, bar: tqdm) -> tuple[Worker, tuple | None]:
    """The next answer of any worker; the bar's clock keeps ticking meanwhile (a pre-training
    takes minutes)."""
    while True:
        try:
            return answers.get(timeout=1.0)
        except queue.Empty:
            bar.refresh()


def build_in_workers(builder: Builder, workers: int) -> None:
    """Build every model of the builder's preset that is not cached yet, `workers` at a time, each
    on its share of the cores. Raises ZooError naming the step when one fails, after
    stopping the other workers."""
    preset = builder.preset
    ready: list[Step] = []
    if preset.real_base:
        base, key = builder.real_base()
        ready += _family_steps(preset, builder.tasks, preset.real_base, base, key, REAL_BASE_WEIGHT)
    if preset.sizes:
        builder.tokenizer()  # every base needs it; one process builds it, before the workers start
    ready += [Step("pt", size=size, cost=math.inf) for size in preset.sizes]
    families = (1 if preset.real_base else 0) + len(preset.sizes) * len(preset.stages)
    bases = len(preset.sizes) * (2 if "it" in preset.stages else 1)
    bar = tqdm(
        total=bases + families * (len(builder.tasks) + 2),
        desc=f"zoo {preset.name} ({workers} workers)",
        unit="step",
        # Steps take from a second to minutes: a rate or time left from their count would mislead.
        bar_format="{desc}: {n}/{total} steps [{elapsed}]{postfix}",
        disable=not builder.progress,
    )
    answers: queue.Queue = queue.Queue()
    cores, shared = torch.get_num_threads(), threads_per_worker(workers)
    pool = [Worker(preset, answers) for _ in range(workers)]
    try:
        idle = list(pool)
        while ready or len(idle) < len(pool):
            ready.sort(key=lambda step: step.cost)
            # A step that runs alone (the demo's one pre-training) takes every core: pre-training
            # is 1.9x slower on one thread. Nothing else becomes ready before it ends, so no
            # core is ever given twice.
            alone = len(ready) == 1 and len(idle) == len(pool)
            while ready and idle:
                idle.pop().start(ready.pop(), cores if alone else shared)
            bar.set_postfix_str(", ".join(w.step.label for w in pool if w not in idle), refresh=True)
            worker, answer = _next_answer(answers, bar)
            step = worker.step
            if answer is None:
                doing = f"on {step.label}" if step else "before its first step"
                raise ZooError(
                    f"a zoo worker ({sys.executable} -m mergeflow.zoo.worker) stopped {doing}, exit "
                    f"code {worker.process.wait()}; its errors, if any, are above"
                )
            outcome, error = answer
            if error is not None:
                raise ZooError(f"{step.label}: {error}")
            idle.append(worker)
            base, built, seconds = outcome
            builder.built += built
            for name in built if builder.progress else ():
                bar.write(f"built  {name} ({seconds:.0f} s)")
            bar.update()
            if step.kind == "pt" and "it" in preset.stages:
                ready.append(Step("it", size=step.size, cost=math.inf))
            if step.kind in preset.stages:
                family = family_name(step.size, step.kind)
                ready += _family_steps(preset, builder.tasks, family, *base, _weight(step.size))
    finally:
        for worker in pool:
            worker.stop()
        bar.close()
        remove_abandoned_stages()
