"""merge_and_evaluate: fetch_experts → compute_task_vectors → merge → evaluate_held_in →
evaluate_held_out → register_model.

The parameters are one pydantic model, so the Prefect UI renders them as a form. With a `grid`,
every combination is merged and scored on the held-in validation split first, and the best one
(highest mean normalised held-in accuracy; the first in grid order on a tie) is the merge that
is evaluated on `split` and registered.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Literal

import pandas as pd
from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field, field_validator

from mergeflow.eval.metrics import normalise, summary, task_infos
from mergeflow.eval.tasks import held_out_tasks
from mergeflow.fetch import FetchedModel
from mergeflow.merges import default_destination, merge_key
from mergeflow.registry import run_url
from mergeflow.settings import load_settings
from mergeflow.storage import NAME
from tasks.compute_task_vectors import compute_task_vectors
from tasks.credentials import load_credentials
from tasks.evaluate import evaluate_held_in, evaluate_held_out, save_scores
from tasks.fetch_experts import fetch_experts
from tasks.merge import merge
from tasks.register import register_model

MAX_GRID_POINTS = 16


class MergeRequest(BaseModel):
    base: str = Field(description="Base model: local path, file:// or s3:// URI")
    base_family: str = Field(
        "default",
        pattern=NAME.pattern,
        description="Registered model name is mergeflow-<base_family>; letters, digits, '.', '_', '-'",
    )
    experts: dict[str, str] = Field(
        description="Held-in task name → that task's expert: path or s3:// URI, or model+adapter for a "
        "LoRA adapter"
    )
    # The methods that merge any number of experts (the Prefect UI shows these as a menu).
    method: Literal[
        "average", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "sce", "ram", "ramplus_tl", "multislerp", "karcher",
    ] = "ties"  # fmt: skip
    parameters: dict[str, float] = Field(
        default_factory=dict, description="Global method parameters, e.g. lambda, density, seed"
    )
    grid: dict[str, list[float]] = Field(
        default_factory=dict,
        description="Values to try per parameter (e.g. lambda: [0.5, 1.0]); the best combination on "
        f"held-in validation wins. At most {MAX_GRID_POINTS} combinations.",
    )
    held_out: list[str] | None = Field(None, description="Held-out tasks; default all")
    split: Literal["validation", "test"] = "test"
    destination: str | None = Field(
        None, description="Where the merged model goes (path or s3:// URI); default under `artifacts`"
    )
    artifacts: str | None = Field(
        None, description="Store for task vectors and merged models; default from mergeflow settings"
    )
    register_in_mlflow: bool = True
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default from mergeflow settings")

    @field_validator("grid")
    @classmethod
    def _small_grid(cls, grid: dict[str, list[float]]) -> dict[str, list[float]]:
        empty = [name for name, values in grid.items() if not values]
        if empty:
            raise ValueError(f"grid parameter {empty[0]!r} has no values")
        points = math.prod(len(values) for values in grid.values())
        if points > MAX_GRID_POINTS:
            raise ValueError(f"grid has {points} combinations; at most {MAX_GRID_POINTS} are allowed")
        return grid


class MergeOutcome(BaseModel):
    merged: str
    parameters: dict[str, float]
    scores: list[dict]
    scores_uri: str
    held_in_normalised: float
    held_out_normalised: float
    grid_trials: list[dict] = []
    flow_run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    run_id: str | None = None


@flow(name="merge-and-evaluate", log_prints=True)
def merge_and_evaluate(request: MergeRequest) -> MergeOutcome:
    load_credentials()
    store = request.artifacts or load_settings().artifacts
    base, experts = fetch_experts(request.base, request.experts)
    vectors = compute_task_vectors(base, experts, store)
    trials = search_grid(request, base, experts, vectors, store) if request.grid else []
    parameters = trials_best(trials) if trials else request.parameters
    destination = request.destination or default_destination(
        store,
        request.base_family,
        request.method,
        merge_key(request.method, parameters, base.sha256, [v.sha256 for v in vectors.values()]),
    )
    merged = merge(base, vectors, request.method, parameters, destination)
    held_in = evaluate_held_in(merged, experts, request.split)
    held_out = evaluate_held_out(merged, base, request.held_out or held_out_tasks(), request.split)
    table = score_table(held_in, held_out, list(experts))
    scores_uri = save_scores(table, merged)
    registered = None
    if request.register_in_mlflow:
        registered = register_model(
            merged,
            request.base_family,
            request.method,
            parameters,
            base,
            experts,
            table[table.model == "merged"],
            request.tracking_uri,
        )
    headline = summary(table).loc["merged", "normalised"]
    outcome = MergeOutcome(
        merged=merged.ref,
        parameters=parameters,
        scores=table.to_dict("records"),
        scores_uri=scores_uri,
        held_in_normalised=float(headline["held_in"]),
        held_out_normalised=float(headline["held_out"]),
        grid_trials=trials,
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None,
        model_name=registered.model_name if registered else None,
        model_version=str(registered.version) if registered else None,
        run_id=registered.run_id if registered else None,
    )
    create_markdown_artifact(
        report(request, outcome, table),
        key="merge-report",
        description=f"{request.method} merge of {len(experts)} experts",
    )
    return outcome


def search_grid(
    request: MergeRequest,
    base: FetchedModel,
    experts: dict[str, FetchedModel],
    vectors: dict[str, FetchedModel],
    store: str,
) -> list[dict]:
    """Merge and score every grid combination on the held-in validation split."""
    names = sorted(request.grid)
    trials = []
    for values in itertools.product(*(request.grid[name] for name in names)):
        parameters = request.parameters | dict(zip(names, values, strict=True))
        key = key_of(request.method, parameters, base, vectors)
        candidate = merge(
            base,
            vectors,
            request.method,
            parameters,
            default_destination(store, request.base_family, request.method, key),
        )
        held_in = evaluate_held_in(candidate, experts, "validation")
        table = score_table(held_in, {"merged": {}, "base": {}}, list(experts))
        value = float(summary(table).loc["merged", ("normalised", "held_in")])
        print(f"grid {parameters}: held-in validation (÷ expert) {value:.3f}")
        trials.append({"parameters": parameters, "held_in_validation": value, "merged": candidate.ref})
    return trials


def key_of(method: str, parameters: dict, base: FetchedModel, vectors: dict[str, FetchedModel]) -> str:
    return merge_key(method, parameters, base.sha256, [vector.sha256 for vector in vectors.values()])


def trials_best(trials: list[dict]) -> dict[str, float]:
    # max keeps the first of equal values; NaN (an expert scoring 0) never wins.
    scored = [t for t in trials if not math.isnan(t["held_in_validation"])] or trials
    return max(scored, key=lambda t: t["held_in_validation"])["parameters"]


def score_table(held_in: dict, held_out: dict, expert_tasks: list[str]) -> pd.DataFrame:
    raw = {("merged", task): value for task, value in held_in["merged"].items()}
    raw |= {(f"expert:{task}", task): value for task, value in held_in["experts"].items()}
    raw |= {("merged", task): value for task, value in held_out["merged"].items()}
    raw |= {("base", task): value for task, value in held_out["base"].items()}
    infos = task_infos({task for _, task in raw})
    return normalise(raw, infos, base="base", experts={task: f"expert:{task}" for task in expert_tasks})


def report(request: MergeRequest, outcome: MergeOutcome, table: pd.DataFrame) -> str:
    merged = table[table.model == "merged"]
    rows = "\n".join(
        f"| {r.task} | {r.kind} | {r.category} | {r.raw:.3f} | {r.normalised:.3f} |"
        for r in merged.itertuples()
    )
    registry = "not registered"
    if outcome.model_name:
        link = run_url(outcome.run_id, request.tracking_uri)
        run = f"[{outcome.run_id}]({link})" if link else f"`{outcome.run_id}`"
        registry = f"MLflow: model `{outcome.model_name}` version {outcome.model_version}, run {run}"
    grid = ""
    if outcome.grid_trials:
        grid = "\n\nGrid (held-in validation, ÷ expert):\n\n| parameters | score |\n|---|---|\n" + "\n".join(
            f"| {t['parameters']} | {t['held_in_validation']:.3f} |" for t in outcome.grid_trials
        )
    return (
        f"# {request.method} merge of {len(request.experts)} experts\n\n"
        f"Merged model: `{outcome.merged}`  \nParameters: `{outcome.parameters}`  \n"
        f"Scores: `{outcome.scores_uri}`  \n{registry}\n\n"
        f"Normalised held-in (÷ expert): **{outcome.held_in_normalised:.3f}**; "
        f"held-out (÷ base): **{outcome.held_out_normalised:.3f}**\n\n"
        "| task | kind | category | accuracy | normalised |\n|---|---|---|---|---|\n" + rows + grid + "\n"
    )


if __name__ == "__main__":
    # python -m flows.merge_and_evaluate request.json: run once, print the outcome as JSON.
    request = MergeRequest.model_validate_json(Path(sys.argv[1]).read_text())
    print(merge_and_evaluate(request).model_dump_json(indent=2))
