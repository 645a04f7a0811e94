"""merge_and_evaluate: fetch_experts → merge → evaluate_held_in → evaluate_held_out → register_model.

The parameters are one pydantic model, so the Prefect UI renders them as a form."""

from __future__ import annotations

from typing import Literal

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from mergeflow.eval.metrics import normalise, summary, task_infos
from mergeflow.eval.tasks import held_out_tasks
from tasks.evaluate import evaluate_held_in, evaluate_held_out
from tasks.fetch_experts import fetch_experts
from tasks.merge import merge
from tasks.register import register_model


class MergeRequest(BaseModel):
    base: str = Field(description="Base model: local path, file:// or s3:// URI")
    base_family: str = Field("default", description="Registered model name is mergeflow-<base_family>")
    experts: dict[str, str] = Field(description="Held-in task name → that task's expert (path or s3:// URI)")
    method: Literal[
        "average", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"
    ] = "ties"
    parameters: dict[str, float] = Field(
        default_factory=dict, description="Global method parameters, e.g. lambda, density, seed"
    )
    held_out: list[str] | None = Field(None, description="Held-out tasks; default all")
    split: Literal["validation", "test"] = "test"
    destination: str = Field(description="Where the merged model goes (path or s3:// URI)")
    register_in_mlflow: bool = True
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default from mergeflow settings")


class MergeOutcome(BaseModel):
    merged: str
    scores: list[dict]
    held_in_normalised: float
    held_out_normalised: float
    model_name: str | None = None
    model_version: str | None = None
    run_id: str | None = None


@flow(name="merge-and-evaluate", log_prints=True)
def merge_and_evaluate(request: MergeRequest) -> MergeOutcome:
    base, experts = fetch_experts(request.base, request.experts)
    merged = merge(base, experts, request.method, request.parameters, request.destination)
    held_in = evaluate_held_in(merged, experts, request.split)
    held_out_names = request.held_out or held_out_tasks()
    held_out = evaluate_held_out(merged, base, held_out_names, request.split)
    table = score_table(held_in, held_out, list(experts))
    registered = None
    if request.register_in_mlflow:
        registered = register_model(
            merged,
            request.base_family,
            request.method,
            request.parameters,
            base,
            experts,
            table[table.model == "merged"],
            request.tracking_uri,
        )
    headline = summary(table).loc["merged", "normalised"]
    outcome = MergeOutcome(
        merged=merged,
        scores=table.to_dict("records"),
        held_in_normalised=float(headline["held_in"]),
        held_out_normalised=float(headline["held_out"]),
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
    registry = (
        f"MLflow: model `{outcome.model_name}` version {outcome.model_version}, run `{outcome.run_id}`"
        if outcome.model_name
        else "not registered"
    )
    return (
        f"# {request.method} merge of {len(request.experts)} experts\n\n"
        f"Merged model: `{outcome.merged}`  \n{registry}\n\n"
        f"Normalised held-in (÷ expert): **{outcome.held_in_normalised:.3f}**; "
        f"held-out (÷ base): **{outcome.held_out_normalised:.3f}**\n\n"
        "| task | kind | category | accuracy | normalised |\n|---|---|---|---|---|\n" + rows + "\n"
    )
