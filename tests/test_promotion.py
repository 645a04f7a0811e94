"""Champion/challenger promotion on a real MLflow registry (sqlite store) and Prefect's API:
gates, the decision recorded as tags, human approval through a paused run, rollback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run
from typer.testing import CliRunner

from flows.promote import PromoteRequest, promote
from mergeflow.cli import app
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.eval.metrics import TaskInfo, normalise
from mergeflow.promotion import Gates, apply, decide, rollback
from mergeflow.registry import MergeRecord, RegistryError, register_merge, resolve_version

TASKS = {"topic": TaskInfo("classification", "held_in"), "part_of_speech": TaskInfo("syntax", "held_out")}


def register(zoo, tmp_path: Path, uri: str, family: str, lam: float, held_in: float, held_out: float) -> int:
    """A real merge (task arithmetic at `lam`, so each is a different model) registered with
    normalised held-in/held-out scores `held_in` and `held_out`."""
    out = tmp_path / f"{family}-{lam}"
    config = {
        "merge_method": "task_arithmetic",
        "base_model": zoo["base"],
        "models": [{"model": zoo["expert_0"]}],
        "parameters": {"lambda": lam},
    }
    manifest = merge(parse_config(config), str(out)).manifest
    raw = {
        ("merged", "topic"): held_in * 0.5,
        ("expert:topic", "topic"): 0.5,
        ("merged", "part_of_speech"): held_out * 0.4,
        ("base", "part_of_speech"): 0.4,
    }
    table = normalise(raw, TASKS, "base", {"topic": "expert:topic"})
    hashes = {m["ref"]: m["sha256"] for m in [manifest["inputs"]["base"], *manifest["inputs"]["models"]]}
    record = MergeRecord(
        merged_folder=out,
        base_family=family,
        method="task_arithmetic",
        parameters={"lambda": lam},
        base=zoo["base"],
        experts=[zoo["expert_0"]],
        input_hashes=hashes,
        scores=table[table.model == "merged"],
        output_uri=None,
        prefect_flow_run_id=None,
        prefect_flow_run_url=None,
        model_sha256=manifest["files"][0]["sha256"],
    )
    return register_merge(record, tracking_uri=uri).version


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def version_tags(uri: str, name: str, version: int) -> dict[str, str]:
    return MlflowClient(uri, registry_uri=uri).get_model_version(name, str(version)).tags


def test_gates_decide_and_the_decision_is_recorded_and_rolled_back(zoo, tmp_path, uri):
    name, gates = "mergeflow-gates", Gates(min_held_in=0.9, max_held_out_drop=0.02)
    first = register(zoo, tmp_path, uri, "gates", 0.1, held_in=0.95, held_out=1.0)
    assert resolve_version(name, "challenger", uri).version == first  # every new version is challenger
    decision = apply(decide(name, gates, tracking_uri=uri), uri)
    assert decision.promoted and decision.champion is None
    assert resolve_version(name, "champion", uri).version == first

    better = register(zoo, tmp_path, uri, "gates", 0.2, held_in=0.97, held_out=0.99)  # drop 0.01: allowed
    assert apply(decide(name, gates, tracking_uri=uri), uri).promoted
    assert resolve_version(name, "champion", uri).version == better

    worse = register(zoo, tmp_path, uri, "gates", 0.3, held_in=0.99, held_out=0.9)
    decision = apply(decide(name, gates, tracking_uri=uri), uri)
    assert not decision.promoted and decision.champion == better
    assert resolve_version(name, "champion", uri).version == better
    tags = version_tags(uri, name, worse)
    assert tags["mergeflow.promotion.decision"] == "rejected"
    assert tags["mergeflow.promotion.reasons"] == "held-out 0.900 < champion's 0.990 - allowed drop 0.020"
    assert tags["mergeflow.promotion.compared_with"] == str(better)

    # Judging the champion itself changes nothing and keeps its record.
    again = apply(decide(name, gates, str(better), uri), uri)
    assert not again.promoted and again.reasons == [f"version {better} is already the champion"]
    assert version_tags(uri, name, better)["mergeflow.promotion.decision"] == "promoted"

    weak = register(zoo, tmp_path, uri, "gates", 0.4, held_in=0.5, held_out=1.2)
    assert decide(name, gates, tracking_uri=uri).reasons == ["held-in 0.500 < required 0.900"]

    assert rollback(name, uri) == first
    assert resolve_version(name, "champion", uri).version == first
    with pytest.raises(RegistryError, match="no previous champion to roll back to"):
        rollback(name, uri)
    assert weak > worse


def test_cli_rolls_back_the_champion(zoo, tmp_path, uri, monkeypatch):
    name = "mergeflow-cli"
    for lam in (0.1, 0.2):
        register(zoo, tmp_path, uri, "cli", lam, held_in=1.0, held_out=1.0 + lam)
        apply(decide(name, Gates(), tracking_uri=uri), uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(app, ["promote", name, "--rollback"])
    assert result.exit_code == 0, result.output
    assert "champion of mergeflow-cli is now version 1" in result.output
    assert resolve_version(name, "champion", uri).version == 1


def wait_for_paused_run(flow_name: str, timeout: float = 120) -> str:
    async def paused():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            return [r.id for r in runs if r.state and r.state.name == "Paused"]

    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = asyncio.run(paused())
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no paused {flow_name} run within {timeout}s")


@pytest.mark.parametrize("approve", [True, False])
def test_approval_pauses_the_run_and_the_answer_decides(prefect_api, zoo, tmp_path, uri, approve):
    family = f"approval-{approve}".lower()
    name = f"mergeflow-{family}"
    register(zoo, tmp_path, uri, family, 0.1, held_in=1.0, held_out=1.0)
    request = PromoteRequest(model_name=name, require_approval=True, approval_timeout_s=120, tracking_uri=uri)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(promote(request)))
    runner.start()
    try:
        run_id = wait_for_paused_run("promote")
        resume_flow_run(run_id, run_input={"approve": approve, "comment": "checked the eval table"})
    finally:
        runner.join(timeout=120)
    assert result["approved"] is approve and result["promoted"] is approve
    tags = version_tags(uri, name, 1)
    assert tags["mergeflow.promotion.approved"] == str(approve).lower()
    assert tags["mergeflow.promotion.comment"] == "checked the eval table"
    if approve:
        assert resolve_version(name, "champion", uri).version == 1
    else:
        with pytest.raises(RegistryError):
            resolve_version(name, "champion", uri)
