"""register_model: an MLflow run per merge and a version of the base family's registered model."""

from __future__ import annotations

import pandas as pd
from prefect import runtime, task
from prefect.cache_policies import NO_CACHE

from mergeflow.fetch import FetchedModel
from mergeflow.registry import MergeRecord, RegisteredVersion, register_merge
from tasks.retries import IO_RETRIES


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="register-model")
def register_model(
    merged: FetchedModel,
    base_family: str,
    method: str,
    parameters: dict,
    base: FetchedModel,
    experts: dict[str, FetchedModel],
    scores: pd.DataFrame,
    tracking_uri: str | None = None,
) -> RegisteredVersion:
    """A model already registered (same content hash) keeps its version; see register_merge."""
    inputs = [base, *experts.values()]
    record = MergeRecord(
        merged_folder=merged.path,
        base_family=base_family,
        method=method,
        parameters=parameters,
        base=base.ref,
        experts=[expert.ref for expert in experts.values()],
        input_hashes={model.ref: model.sha256 for model in inputs},
        scores=scores,
        output_uri=merged.ref,
        prefect_flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None,
        prefect_flow_run_url=runtime.flow_run.ui_url,
        model_sha256=merged.sha256,
    )
    return register_merge(record, tracking_uri=tracking_uri)
