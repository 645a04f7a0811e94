"""study: the paper's grid on a zoo preset (mergeflow.study), cells run in parallel on Dask.

`study` reads its parameters and starts `study_cells` with a DaskTaskRunner: a local cluster of
`workers` single-threaded workers by default, or the scheduler at `dask_address`. Every cell is
a task cached by its content key, so an interrupted study resumes where it stopped. Results go
to `<artifacts>/studies/<name>/results.parquet`, a parent MLflow run with a child per cell, and
a report (Markdown + plots) logged to both MLflow and Prefect.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.client.orchestration import get_client
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, Field, model_validator

from mergeflow.settings import load_settings
from mergeflow.study import StudyGrid, enumerate_cells, largest_first, shared_scorings
from mergeflow.zoo.build import load_index
from tasks.credentials import load_credentials
from tasks.study import report_study, save_results, study_cell, study_family, study_scores

QUICK = StudyGrid(expert_counts=[1, 2], methods=["average", "ties"], seeds=[0, 1])


class StudyRequest(BaseModel):
    name: str | None = Field(
        None,
        description="Study name: results under <artifacts>/studies/<name>/; default the preset's "
        "name, with -quick added for the quick grid",
    )
    preset: str = Field("tiny", description="Built zoo preset whose families are studied")
    grid: StudyGrid = Field(default_factory=StudyGrid)
    quick: bool = Field(False, description="Use the small grid (2 methods, 1-2 experts, 2 seeds)")
    workers: int = Field(2, ge=1, description="Local Dask workers (one thread each)")
    dask_address: str | None = Field(None, description="An existing Dask scheduler, e.g. tcp://host:8786")
    artifacts: str | None = Field(None, description="Artifact store; default from mergeflow settings")
    report_dir: str | None = Field(
        None, description="Where the report goes; default ~/.mergeflow/studies/<name>"
    )
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default from mergeflow settings")

    @model_validator(mode="after")
    def _name_after_the_preset(self) -> StudyRequest:
        # Studies of different presets must not share a results folder by default.
        if self.name is None:
            self.name = f"{self.preset}-quick" if self.quick else self.preset
        return self


@flow(name="study", log_prints=True)
def study(request: StudyRequest) -> dict:
    load_credentials()
    settings = load_settings()
    store = request.artifacts or settings.artifacts
    grid = QUICK.model_copy(update={"families": request.grid.families}) if request.quick else request.grid
    index = load_index(request.preset)
    cells = enumerate_cells(index, grid)
    families = sorted({cell.family for cell in cells})
    print(f"study {request.name!r}: {len(cells)} cells over {len(families)} families of {request.preset!r}")
    runner = (
        DaskTaskRunner(address=request.dask_address)
        if request.dask_address
        else DaskTaskRunner(cluster_kwargs={"n_workers": request.workers, "threads_per_worker": 1})
    )
    with api_shared_with_workers():
        table = study_cells.with_options(task_runner=runner)(index, cells, families, store, grid.held_out)
    uri = save_results(table, f"{store.rstrip('/')}/studies/{request.name}/results.parquet")
    folder = Path(request.report_dir or settings.home / "studies" / request.name)
    run_id = report_study(request.name, table, folder, request.tracking_uri)
    print(f"results: {uri}; report: {folder / 'report.md'}; MLflow run {run_id}")
    return {"cells": len(cells), "results": uri, "report": str(folder / "report.md"), "mlflow_run_id": run_id}


@contextlib.contextmanager
def api_shared_with_workers():
    """Dask workers are new processes: without PREFECT_API_URL each would start a temporary
    Prefect server of its own (seconds of start-up and a CPU-hungry process per worker), and
    their task runs would not show in this run's API. Local workers inherit the environment
    when the cluster starts, so point it at the API this run uses for that long."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    with get_client(sync_client=True) as client:
        os.environ["PREFECT_API_URL"] = str(client.api_url).rstrip("/")
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


@flow(name="study-cells")
def study_cells(
    index: dict, cells: list, families: list[str], store: str, held_out: list[str] | None
) -> pd.DataFrame:
    # Each family's shared work first (reference scores, shared out among the workers, then task
    # vectors), so parallel cells never compute the same thing twice; then its cells. Each step
    # waits only for its own family's (Dask starts a task once its futures are done), so no
    # worker idles at a barrier while the other finishes the last scoring of another family.
    scorings = {
        family: [
            study_scores.submit(path, tasks, splits, 1)
            for path, tasks, splits in shared_scorings(index, family, held_out)
        ]
        for family in families
    }
    references = {
        family: study_family.submit(index, family, store, held_out, 1, wait_for=scorings[family])
        for family in families
    }
    cell_futures = [
        study_cell.submit(cell, store, held_out, 1, wait_for=[references[cell.family]])
        for cell in largest_first(cells)
    ]
    parts = [references[family].result() for family in families]
    return pd.concat(parts + [future.result() for future in cell_futures], ignore_index=True)


if __name__ == "__main__":
    # python -m flows.study request.json
    print(json.dumps(study(StudyRequest.model_validate_json(Path(sys.argv[1]).read_text())), indent=2))
