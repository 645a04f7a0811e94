"""The pipeline demo's flow on the micro zoo: publish, the four paper methods, the best one
registered; the table it prints."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow

from flows.demo import PAPER_METHODS, best_method, demo, summary_table


def test_demo_merges_with_every_paper_method_and_registers_the_best(
    prefect_api, micro_zoo, tmp_path, monkeypatch
):
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(micro_zoo[0]))
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGEFLOW_ARTIFACTS", str(tmp_path / "artifacts"))
    outcomes = demo(preset="micro-test", family="tinymicro-it-trained-here")

    assert set(outcomes) == set(PAPER_METHODS) | {"registered"}
    # λ was searched for the methods the paper tunes it for.
    assert len(outcomes["task_arithmetic"].grid_trials) == 3 and not outcomes["average"].grid_trials
    best = best_method({m: outcomes[m] for m in PAPER_METHODS})
    registered = outcomes["registered"]
    assert registered.merged == outcomes[best].merged and registered.parameters == outcomes[best].parameters
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='mergeflow-tinymicro-it-trained-here'")
    assert str(version.version) == registered.model_version
    assert client.get_run(version.run_id).data.params["method"] == best

    table = summary_table(outcomes).splitlines()
    assert len(table) == 1 + len(PAPER_METHODS)
    assert table[2].startswith("task_arithmetic") and "lambda=" in table[2]


def test_flows_start_prefect_servers_without_telemetry_unless_the_user_asks():
    """Offline, the temporary server's telemetry logged an ERROR in the middle of the demo."""
    code = "import flows, os; print(os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'])"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}

    def value(extra: dict) -> str:
        run = subprocess.run([sys.executable, "-c", code], env=env | extra, capture_output=True, text=True)
        return run.stdout.strip()

    assert value({}) == "false"
    assert value({"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}) == "true"
