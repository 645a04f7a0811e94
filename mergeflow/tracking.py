"""A study in MLflow: one parent run with the results table and report, a child run per cell
with its parameters and headline scores."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mergeflow.registry import _experiment_id, client_for
from mergeflow.report import CELL, cell_scores


def log_study(
    name: str, table: pd.DataFrame, report_folder: Path | None, tracking_uri: str | None = None
) -> str:
    """Returns the parent run's id."""
    client, uri = client_for(tracking_uri)
    experiment_id = _experiment_id(client, uri, f"mergeflow-study-{name}")
    parent = client.create_run(experiment_id, run_name=f"study-{name}", tags={"mergeflow.study": name})
    parent_id = parent.info.run_id
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "results.parquet"
        table.to_parquet(path, index=False)
        client.log_artifact(parent_id, str(path))
    if report_folder is not None:
        client.log_artifacts(parent_id, str(report_folder), "report")
    now = int(time.time() * 1000)
    for cell in cell_scores(table).itertuples():
        labels = {column: str(getattr(cell, column)) for column in CELL} | {"model": cell.model}
        child = client.create_run(
            experiment_id,
            run_name="/".join(labels[c] for c in ("family", "method", "n_experts", "seed"))
            + f"/{cell.model}",
            tags={MLFLOW_PARENT_RUN_ID: parent_id, "mergeflow.study": name},
        )
        parameters = table[(table[CELL] == pd.Series({c: getattr(cell, c) for c in CELL})).all(axis=1)]
        merge_parameters = parameters["parameters"].iloc[0] if len(parameters) else "{}"
        client.log_batch(
            child.info.run_id,
            params=[Param(k, v) for k, v in labels.items()] + [Param("merge_parameters", merge_parameters)],
            metrics=[
                Metric(f"{kind}_normalised_mean", float(getattr(cell, kind)), now, 0)
                for kind in ("held_in", "held_out")
                if not pd.isna(getattr(cell, kind))
            ],
            tags=[RunTag("mergeflow.cell", json.dumps(labels, sort_keys=True))],
        )
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent_id)
    return parent_id
