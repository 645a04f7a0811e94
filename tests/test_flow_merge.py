"""merge_and_evaluate end to end on the embedded defaults: a real (ephemeral) Prefect API, a
local MLflow sqlite store, the micro zoo trained in the test session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.merge_and_evaluate import MergeRequest, merge_and_evaluate
from mergeflow.checkpoint import MANIFEST
from mergeflow.registry import load_registered


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def request_for(micro_zoo, tmp_path: Path, **overrides) -> MergeRequest:
    _, index = micro_zoo
    family = index["families"]["tinymicro-it-trained-here"]
    values = {
        "base": family["base"],
        "base_family": "tinymicro-it",
        "experts": dict(family["experts"]),
        "method": "ties",
        "parameters": {"density": 0.5, "lambda": 1.0},
        "held_out": ["part_of_speech"],
        "split": "validation",
        "destination": str(tmp_path / "merged"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    } | overrides
    return MergeRequest(**values)


def test_a_merge_is_evaluated_registered_and_loads_back(prefect_api, micro_zoo, tmp_path):
    request = request_for(micro_zoo, tmp_path)
    state = merge_and_evaluate(request, return_state=True)
    assert state.is_completed()
    outcome = state.result()
    merged = Path(outcome.merged)
    manifest = json.loads((merged / MANIFEST).read_text())
    assert manifest["method"] == "ties"
    tasks = {row["task"]: row for row in outcome.scores if row["model"] == "merged"}
    assert set(tasks) == {"text_genre", "part_of_speech"}
    assert tasks["text_genre"]["kind"] == "held_in" and tasks["part_of_speech"]["kind"] == "held_out"
    # A single expert merged with TIES at density 0.5 keeps only part of its task vector.
    assert 0 < outcome.held_in_normalised <= 1.5

    client = mlflow.MlflowClient(request.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.data.params["method"] == "ties"
    assert "normalised/text_genre" in run.data.metrics
    assert run.data.tags["mergeflow.prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    folder = load_registered(outcome.model_name, outcome.model_version, tracking_uri=request.tracking_uri,
                             dest=tmp_path / "loaded")
    assert (folder / "config.json").is_file()


def test_a_missing_expert_fails_the_run_and_registers_nothing(prefect_api, micro_zoo, tmp_path):
    request = request_for(micro_zoo, tmp_path, experts={"text_genre": str(tmp_path / "no-such-expert")})
    state = merge_and_evaluate(request, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no-such-expert"):
        state.result()
    assert mlflow.MlflowClient(request.tracking_uri).search_registered_models() == []
    assert not (tmp_path / "merged").exists()


def test_a_second_identical_run_reuses_the_reference_scores(prefect_api, micro_zoo, tmp_path):
    request = request_for(micro_zoo, tmp_path, register_in_mlflow=False)
    first = merge_and_evaluate(request, return_state=True)
    second = merge_and_evaluate(request, return_state=True)
    assert first.is_completed() and second.is_completed()

    async def reference_states(flow_run_id):
        async with get_client() as client:
            runs = await client.read_task_runs()
            mine = [r for r in runs if r.flow_run_id == flow_run_id and "score-reference" in r.name]
            return [r.state.name for r in mine]

    states = asyncio.run(reference_states(second.state_details.flow_run_id))
    assert states and all(name == "Cached" for name in states)
