"""The steps of the study flow: one task per grid cell (cached by the cell's content key, so a
re-run computes only missing cells), reference rows per family, saving and reporting."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from mergeflow.report import write_report
from mergeflow.storage import locate
from mergeflow.study import Cell, prepare_family, run_cell, score
from mergeflow.tracking import log_study
from tasks.evaluate import LIBRARY_PRINTS_UNLOGGED
from tasks.retries import IO_RETRIES


def _cell_key(context, parameters) -> str:
    held_out = "+".join(parameters["held_out"] or ["all"])
    return f"study-cell-{parameters['cell'].key()}-{held_out}-{parameters['store']}"


@task(
    cache_key_fn=_cell_key,
    cache_expiration=timedelta(days=90),
    persist_result=True,
    task_run_name="cell-{cell.family}-{cell.method}-n{cell.n_experts}-s{cell.seed}",
    **LIBRARY_PRINTS_UNLOGGED,
)
def study_cell(cell: Cell, store: str, held_out: list[str] | None, threads: int) -> pd.DataFrame:
    torch.set_num_threads(threads)
    return run_cell(cell, store, held_out)


def _scores_run_name() -> str:
    return f"score-{Path(task_run.parameters['path']).name}"


@task(cache_policy=NO_CACHE, task_run_name=_scores_run_name, **LIBRARY_PRINTS_UNLOGGED)
def study_scores(path: str, tasks: list[str], splits: list[str], threads: int) -> None:
    """One model's shared scores (mergeflow.study.shared_scorings), into the score cache."""
    torch.set_num_threads(threads)
    score(path, tasks, splits)


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="prepare-{family}")
def study_family(
    index: dict, family: str, store: str, held_out: list[str] | None, threads: int
) -> pd.DataFrame:
    """Task vectors, expert validation scores and reference rows of one family (its cells'
    shared work, done once); returns the reference rows."""
    torch.set_num_threads(threads)
    return prepare_family(index, family, store, held_out)


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="save-results")
def save_results(table: pd.DataFrame, uri: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "results.parquet"
        table.to_parquet(path, index=False)
        locate(uri).write_bytes(path.read_bytes())
    return uri


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="report")
def report_study(name: str, table: pd.DataFrame, folder: Path, tracking_uri: str | None) -> str:
    """Writes the report, logs the study to MLflow and publishes the report as an artifact."""
    report = write_report(table, folder, title=f"mergeflow study {name!r}")
    run_id = log_study(name, table, folder, tracking_uri)
    text = report.read_text().replace("](", f"]({folder}/")  # images by absolute path
    create_markdown_artifact(text, key=f"study-{name}".replace("_", "-"), description=f"study {name}")
    return run_id
