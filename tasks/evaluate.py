"""evaluate_held_in, evaluate_held_out: the harness on the merged model, with the references the
paper normalises by (each expert on its own task, the base on held-out tasks).

Scores of the experts and the base are cached by model content hash, task and split, so a second
merge of the same experts re-scores only the merged model."""

from __future__ import annotations

from datetime import timedelta

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeflow.eval.harness import evaluate
from mergeflow.fetch import FetchedModel, fetch_model


def _reference_key(context, parameters) -> str:
    model: FetchedModel = parameters["model"]
    return f"accuracy-{model.sha256}-{'+'.join(parameters['tasks'])}-{parameters['split']}"


@task(
    cache_key_fn=_reference_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
    task_run_name="score-reference-{split}",
)
def score_reference(model: FetchedModel, tasks: list[str], split: str) -> dict[str, float]:
    """Accuracy of an expert or the base; cached by its content hash."""
    return evaluate(model.path, tasks, split)


@task(cache_policy=NO_CACHE, task_run_name="evaluate-held-in")
def evaluate_held_in(
    merged: str, experts: dict[str, FetchedModel], split: str
) -> dict[str, dict[str, float]]:
    """`merged` is a path or s3:// URI. Returns {"merged": {task: acc}, "experts": {task: acc of
    that task's expert}}."""
    expert_scores = {name: score_reference(expert, [name], split)[name] for name, expert in experts.items()}
    return {"merged": evaluate(fetch_model(merged).path, list(experts), split), "experts": expert_scores}


@task(cache_policy=NO_CACHE, task_run_name="evaluate-held-out")
def evaluate_held_out(
    merged: str, base: FetchedModel, tasks: list[str], split: str
) -> dict[str, dict[str, float]]:
    """Returns {"merged": {task: acc}, "base": {task: acc}}."""
    merged_scores = evaluate(fetch_model(merged).path, tasks, split)
    return {"merged": merged_scores, "base": score_reference(base, tasks, split)}
