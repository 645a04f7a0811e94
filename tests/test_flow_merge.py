"""merge_and_evaluate end to end on the embedded defaults: a real (ephemeral) Prefect API, a
local MLflow sqlite store, the micro zoo trained in the test session."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import load_folder, settled_task_runs, state_name
from lora_adapters import write_adapter

from flows.merge_and_evaluate import MergeRequest, merge_and_evaluate
from mergeflow.checkpoint import MANIFEST
from mergeflow.fetch import fetch_model
from mergeflow.registry import RegistryError, load_registered


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
        "artifacts": str(tmp_path / "artifacts"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    } | overrides
    return MergeRequest(**values)


def test_a_merge_is_evaluated_registered_and_loads_back(prefect_api, micro_zoo, tmp_path, monkeypatch):
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
    # The merge read the stored task vector, whose lineage names the expert.
    (vector,) = (tmp_path / "artifacts" / "task-vectors").iterdir()
    lineage = manifest["inputs"]["models"][0]
    assert lineage["ref"] == str(vector) and lineage["task_vector_of"]["ref"] == request.experts["text_genre"]
    saved = Path(outcome.scores_uri).read_text()
    assert saved.splitlines()[0] == "task,category,kind,model,raw,normalised" and "part_of_speech" in saved

    client = mlflow.MlflowClient(request.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.data.params["method"] == "ties"
    assert "normalised/text_genre" in run.data.metrics
    assert run.data.tags["mergeflow.prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    folder = load_registered(
        outcome.model_name, outcome.model_version, tracking_uri=request.tracking_uri, dest=tmp_path / "loaded"
    )
    assert (folder / "config.json").is_file()
    # A registered version is a model reference like any other, e.g. as the base of a later merge.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", request.tracking_uri)
    fetched = fetch_model(f"models:/{outcome.model_name}/{outcome.model_version}")
    assert fetched.sha256 == fetch_model(outcome.merged).sha256
    with pytest.raises(
        RegistryError, match="mergeflow-tinymicro-it champion .*no such registered model version"
    ):
        fetch_model("models:/mergeflow-tinymicro-it/champion")


def test_an_expert_given_as_base_plus_lora_adapter_is_merged_evaluated_and_registered(
    prefect_api, micro_zoo, tmp_path
):
    _, index = micro_zoo
    base = index["families"]["tinymicro-it-trained-here"]["base"]
    modules = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    adapter = write_adapter(tmp_path / "text-genre-lora", base, modules, alpha=0.5)
    expert = f"{base}+{adapter}"
    request = request_for(
        micro_zoo, tmp_path, experts={"text_genre": expert}, method="task_arithmetic", parameters={}
    )
    state = merge_and_evaluate(request, return_state=True)
    assert state.is_completed()
    outcome = state.result()
    # λ = 1 on the one expert's task vector gives the adapted model back, so it scores as the expert.
    assert outcome.held_in_normalised == pytest.approx(1.0)
    merged = load_folder(outcome.merged)
    adapted = load_folder(fetch_model(expert).path)
    original = load_folder(base)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert torch.allclose(merged[name], adapted[name], atol=1e-6)
        assert not torch.allclose(merged[name], original[name], atol=1e-3)
    # The registry's lineage names the expert as the user wrote it, with the adapted model's hash.
    run = mlflow.MlflowClient(request.tracking_uri).get_run(outcome.run_id)
    inputs = {
        run.data.tags[f"mergeflow.input.{i}.ref"]: run.data.tags[f"mergeflow.input.{i}.sha256"]
        for i in range(2)
    }
    assert inputs == {base: fetch_model(base).sha256, expert: fetch_model(expert).sha256}


def test_a_missing_expert_fails_the_run_and_registers_nothing(prefect_api, micro_zoo, tmp_path):
    request = request_for(micro_zoo, tmp_path, experts={"text_genre": str(tmp_path / "no-such-expert")})
    state = merge_and_evaluate(request, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no-such-expert"):
        state.result()
    assert mlflow.MlflowClient(request.tracking_uri).search_registered_models() == []
    assert not (tmp_path / "merged").exists()


def test_a_second_identical_run_recomputes_nothing(prefect_api, micro_zoo, tmp_path):
    request = request_for(micro_zoo, tmp_path, destination=None)
    first = merge_and_evaluate(request, return_state=True)
    assert first.is_completed()
    merged = Path(first.result().merged)
    assert merged.parent.parent == tmp_path / "artifacts" / "merged"
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*.safetensors")}

    second = merge_and_evaluate(request, return_state=True)
    assert second.is_completed()
    # Every score comes from the cache; no task vector or merged shard was written again.
    expected = {"score-merged-validation", "score-base-validation", "score-expert:text_genre-validation"}
    runs = settled_task_runs(
        lambda runs: expected <= {r.name for r in runs}, second.state_details.flow_run_id
    )
    scores = {r.name: state_name(r) for r in runs if r.name.startswith("score-")}
    assert set(scores) >= expected
    assert set(scores.values()) == {"Cached"}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*.safetensors")} == written
    # And the registry keeps one version of the one model.
    assert second.result().model_version == first.result().model_version
    versions = mlflow.MlflowClient(request.tracking_uri).search_model_versions(
        "name='mergeflow-tinymicro-it'"
    )
    assert len(versions) == 1


def test_a_grid_is_searched_on_validation_and_the_best_is_kept(prefect_api, micro_zoo, tmp_path):
    request = request_for(
        micro_zoo,
        tmp_path,
        method="task_arithmetic",
        parameters={},
        grid={"lambda": [0.0, 1.0]},
        register_in_mlflow=False,
    )
    outcome = merge_and_evaluate(request)
    trials = {t["parameters"]["lambda"]: t["held_in_validation"] for t in outcome.grid_trials}
    assert set(trials) == {0.0, 1.0}
    # λ = 0 is the base itself; the expert's own task vector at λ = 1 scores as the expert does.
    assert trials[1.0] == pytest.approx(1.0)
    assert trials[1.0] > trials[0.0]
    assert outcome.parameters == {"lambda": 1.0}


def test_a_grid_too_large_is_refused_before_anything_runs(micro_zoo, tmp_path):
    with pytest.raises(ValueError, match="grid has 25 combinations; at most 16"):
        request_for(
            micro_zoo,
            tmp_path,
            grid={"lambda": [0.1, 0.2, 0.3, 0.4, 0.5], "density": [0.1, 0.2, 0.3, 0.4, 0.5]},
        )


def test_library_prints_in_scoring_tasks_stay_out_of_the_run_logs(prefect_api, caplog):
    # dill (through datasets' fingerprinting) disassembles functions by printing to a swapped
    # sys.stdout; a flow's log_prints patches print itself and would log every line.
    import dill.detect
    from prefect import flow, task

    from tasks.evaluate import LIBRARY_PRINTS_UNLOGGED, score
    from tasks.study import study_cell, study_scores

    def sample(columns):
        return len(columns)

    @task(**LIBRARY_PRINTS_UNLOGGED)
    def scoring_like():
        return dill.detect.nestedglobals(sample)

    @flow(log_prints=True)
    def run():
        print("the flow's own message")
        return scoring_like()

    caplog.set_level("INFO")
    assert run() == ["len"]
    assert "the flow's own message" in caplog.text and "LOAD_GLOBAL" not in caplog.text
    assert all(t.log_prints is False for t in (score, study_cell, study_scores))


def test_the_form_offers_every_method_that_merges_any_number_of_experts():
    from typing import get_args

    from mergeflow.methods import METHODS

    offered = set(get_args(MergeRequest.model_fields["method"].annotation))
    any_count = {name for name, m in METHODS.items() if m.min_models == 1 and m.max_models is None}
    assert offered == any_count
