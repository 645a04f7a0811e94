"""Evaluate model folders on tasks and build the paper's normalised table."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from mergeflow.errors import CheckpointError
from mergeflow.eval import metrics
from mergeflow.eval.scoring import accuracy
from mergeflow.eval.tasks import load_task


def load_model(path: str | Path):
    """A causal LM and its tokenizer from a local HF folder, float32, for scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Its per-file bars would drown ours: loading a small model takes milliseconds.
    transformers_logging.disable_progress_bar()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: cannot load model or tokenizer: {error}") from error
    return model, tokenizer


def evaluate(
    path: str | Path, tasks: Sequence[str], split: str = "test", progress: bool = False
) -> dict[str, float]:
    """Accuracy of one model folder on each task's split."""
    model, tokenizer = load_model(path)
    return evaluate_loaded(model, tokenizer, tasks, split, progress)


def evaluate_loaded(
    model, tokenizer, tasks: Sequence[str], split: str, progress: bool = False
) -> dict[str, float]:
    """Accuracy of a model already in memory on each task's split."""
    return {
        task: accuracy(model, tokenizer, load_task(task)[split], progress=progress, description=task)
        for task in tasks
    }


def evaluate_models(
    models: Mapping[str, str | Path],
    tasks: Mapping[str, Sequence[str]],
    split: str = "test",
    progress: bool = False,
) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """`tasks` maps each model name to the tasks it is scored on (an expert needs only its own).
    Returns raw accuracies keyed by (model, task) and seconds spent per model."""
    raw, seconds = {}, {}
    for name, path in models.items():
        started = time.perf_counter()
        for task, value in evaluate(path, tasks[name], split, progress).items():
            raw[(name, task)] = value
        seconds[name] = time.perf_counter() - started
    return raw, seconds


def paper_table(raw: Mapping[tuple[str, str], float], base: str, experts: Mapping[str, str]) -> pd.DataFrame:
    """The tidy table (task, category, kind, model, raw, normalised) over every scored pair."""
    return metrics.normalise(raw, metrics.task_infos({task for _, task in raw}), base, experts)
