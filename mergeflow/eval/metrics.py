"""The paper's normalised metrics, as a tidy table.

- held-in task t: accuracy of a model ÷ accuracy of the expert trained on t (on the same split);
- held-out task t: accuracy of a model ÷ accuracy of the base model.

A normalised held-in score of 1.0 means the merged model matches the expert on its own task; a
held-out score of 1.0 means merging neither helped nor hurt generalisation relative to the base.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

from mergeflow.errors import DataError

COLUMNS = ["task", "category", "kind", "model", "raw", "normalised"]


@dataclass(frozen=True)
class TaskInfo:
    category: str
    kind: str  # "held_in" | "held_out"


def normalise(
    raw: Mapping[tuple[str, str], float],
    tasks: Mapping[str, TaskInfo],
    base: str,
    experts: Mapping[str, str],
) -> pd.DataFrame:
    """`raw` maps (model, task) to accuracy; `experts` maps each held-in task to the name of its
    expert. Returns one row per (model, task) with the raw and the normalised score."""
    rows = []
    for (model, task), value in sorted(raw.items()):
        if task not in tasks:
            raise DataError(f"score for unknown task {task!r}")
        info = tasks[task]
        if info.kind == "held_in":
            if task not in experts:
                raise DataError(f"held-in task {task!r} has no expert to normalise by")
            reference = (experts[task], task)
        else:
            reference = (base, task)
        if reference not in raw:
            raise DataError(f"normalising {model} on {task} needs the score of {reference[0]} on {task}")
        denominator = raw[reference]
        normalised = value / denominator if denominator > 0 else float("nan")
        rows.append([task, info.category, info.kind, model, value, normalised])
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean raw and normalised score per model and kind (the paper's headline numbers)."""
    return (
        table.groupby(["model", "kind"], sort=True)[["raw", "normalised"]]
        .mean()
        .reset_index()
        .pivot(index="model", columns="kind", values=["raw", "normalised"])
    )


def task_infos(names: Iterable[str]) -> dict[str, TaskInfo]:
    from mergeflow.eval.tasks import TASKS

    return {name: TaskInfo(TASKS[name].category, TASKS[name].kind) for name in names}
