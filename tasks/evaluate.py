"""evaluate_held_in, evaluate_held_out: the harness on the merged model, with the references the
paper normalises by (each expert on its own task, the base on held-out tasks).

Every score is cached by model content hash, task and split: a second run of the same merge
re-scores nothing, and a new merge of the same experts scores only the merged model."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeflow.eval.harness import evaluate
from mergeflow.fetch import FetchedModel, fetch_model
from mergeflow.storage import locate
from tasks.retries import IO_RETRIES


def _scores_key(context, parameters) -> str:
    model: FetchedModel = parameters["model"]
    return f"accuracy-{model.sha256}-{'+'.join(parameters['tasks'])}-{parameters['split']}"


# Scoring loads data with `datasets`, whose fingerprinting has dill disassemble functions by
# printing to stdout. A flow's log_prints would turn each of those lines into a run log (hundreds
# per task), so tasks that score keep prints as prints.
LIBRARY_PRINTS_UNLOGGED = {"log_prints": False}


@task(
    cache_key_fn=_scores_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
    task_run_name="score-{role}-{split}",
    **LIBRARY_PRINTS_UNLOGGED,
)
def score(model: FetchedModel, tasks: list[str], split: str, role: str) -> dict[str, float]:
    """Accuracy of `model` on `tasks`; `role` (merged, base, expert:<task>) names the task run."""
    # Fetched again from its reference: the cached FetchedModel's local path may be gone.
    return evaluate(fetch_model(model.ref).path, tasks, split)


@task(cache_policy=NO_CACHE, task_run_name="evaluate-held-in")
def evaluate_held_in(
    merged: FetchedModel, experts: dict[str, FetchedModel], split: str
) -> dict[str, dict[str, float]]:
    """{"merged": {task: acc}, "experts": {task: acc of that task's expert}}."""
    expert_scores = {
        name: score(expert, [name], split, f"expert:{name}")[name] for name, expert in experts.items()
    }
    return {"merged": score(merged, list(experts), split, "merged"), "experts": expert_scores}


@task(cache_policy=NO_CACHE, task_run_name="evaluate-held-out")
def evaluate_held_out(
    merged: FetchedModel, base: FetchedModel, tasks: list[str], split: str
) -> dict[str, dict[str, float]]:
    """{"merged": {task: acc}, "base": {task: acc}}."""
    return {"merged": score(merged, tasks, split, "merged"), "base": score(base, tasks, split, "base")}


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="save-scores")
def save_scores(table: pd.DataFrame, merged: FetchedModel) -> str:
    """The score table as CSV beside the merged model (`<merged>.scores.csv`); returns its URI."""
    uri = f"{merged.ref.rstrip('/')}.scores.csv"
    locate(uri).write_bytes(table.to_csv(index=False).encode())
    return uri
