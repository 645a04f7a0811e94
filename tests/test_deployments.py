"""Deployments, event-driven merges and promotion on real processes: the stack's Prefect server,
MLflow server and SeaweedFS, `prefect deploy` from deployments/prefect.yaml, and a process
worker running the flows from this checkout."""

from __future__ import annotations

import ast
import importlib
import json
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from s3_server import free_ports
from stack_helpers import (
    ROOT,
    background,
    get_json,
    merge_runs,
    mergeflow_cli,
    prefect,
    runs_of,
    wait_for_runs,
    with_env,
)

from mergeflow.publish import publish_folder

BASE = "tinymicro-landing"
MODEL = f"mergeflow-{BASE}"


def wait_for_paused(api: str, deployment: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paused = [r["id"] for r in runs_of(api, deployment) if r["state_name"] == "Paused"]
        if paused:
            return paused[0]
        time.sleep(1)
    raise AssertionError(f"no paused {deployment} run within {timeout}s")


def resume(api: str, flow_run_id: str, run_input: dict, timeout: float = 120) -> None:
    """Resume a paused run with a person's answer, as the UI does. The server may answer 503
    while its database is busy, or reject the input until the paused run has stored its form's
    schema; both are retried until accepted."""
    url = f"{api}/flow_runs/{flow_run_id}/resume"
    request = urllib.request.Request(
        url,
        data=json.dumps({"run_input": run_input}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline, answer = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with opener.open(request, timeout=30) as response:
                answer = json.loads(response.read())
            if answer.get("status") == "ACCEPT":
                return
        except urllib.error.HTTPError as error:
            if error.code != 503:
                raise
            answer = {"status": 503}
        time.sleep(1)
    raise AssertionError(f"resume of {flow_run_id} not accepted within {timeout}s: {answer}")


def test_an_expert_landing_merges_once_and_promotion_follows(stack, deployed, micro_zoo):
    settings, _, s3 = stack
    env, api = deployed, deployed["PREFECT_API_URL"]
    names = {d["name"] for d in get_json(f"{api}/deployments/filter", {})}
    assert names >= {"merge-and-evaluate", "publish-zoo", "promote", "merge-on-landing", "watch-experts"}

    # A burst: two experts land seconds apart (the family's multitask model stands in for a
    # second expert). One merge-on-landing run merges both; the queued one finds the set merged.
    family = micro_zoo[1]["families"]["tinymicro-it-trained-here"]
    published = mergeflow_cli(
        env,
        "expert",
        "publish",
        family["experts"]["text_genre"],
        "--base",
        BASE,
        "--task",
        "text_genre",
        "--base-model",
        family["base"],
    )
    assert "emitted mergeflow.expert.landed" in published
    second = mergeflow_cli(env, "expert", "publish", family["multitask"], "--base", BASE, "--task", "topic")
    assert "emitted mergeflow.expert.landed" in second

    wait_for_runs(api, "merge-on-landing", 2)
    merges = merge_runs(api)
    assert len(merges) == 4  # one set, the four paper methods
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name='{MODEL}'")
    (claim_key,) = [
        o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"landings/{BASE}/")["Contents"]
    ]
    claim = json.loads(s3.get_object(Bucket=settings.bucket, Key=claim_key)["Body"].read())
    assert claim["status"] == "done" and set(claim["experts"]) == {"text_genre", "topic"}
    assert set(claim["versions"]) == {"average", "task_arithmetic", "ties", "dare_ties"}
    assert len(versions) == len(set(claim["versions"].values()))
    newest = max(int(v.version) for v in versions)
    assert client.get_model_version_by_alias(MODEL, "challenger").version == str(newest)

    # The same landing announced again (a duplicate event) and a copy of the expert uploaded by
    # another tool (found by the watcher): the expert set is the same, so nothing merges again.
    from mergeflow.events import EXPERT_LANDED, emit

    expert_uri = published.split()[1]
    sha = published.split("sha256 ")[1][:12]
    payload = {
        "base": BASE,
        "task": "text_genre",
        "sha256": sha,
        "base_model": f"s3://{settings.bucket}/bases/{BASE}",
    }
    emit(EXPERT_LANDED, expert_uri, payload, sha, api_url=api)
    with_env(
        env,
        publish_folder,
        Path(family["experts"]["text_genre"]),
        f"s3://{settings.bucket}/experts/{BASE}/text_genre/copy-by-other-tool",
    )
    prefect(env, "deployment", "run", "watch-experts/watch-experts")
    wait_for_runs(api, "watch-experts", 1)
    wait_for_runs(api, "merge-on-landing", 4)
    assert merge_runs(api) == merges  # the two later runs launched no merge
    assert len(client.search_model_versions(f"name='{MODEL}'")) == len(versions)

    # The registration event started promote with the default gates; whatever it decided is
    # recorded on the newest version, and the champion alias agrees with it.
    wait_for_runs(api, "promote", 1)
    decision = client.get_model_version(MODEL, str(newest)).tags["mergeflow.promotion.decision"]
    champion = client.get_registered_model(MODEL).aliases.get("champion")
    assert (decision, champion) in {("promoted", str(newest)), ("rejected", None)}
    # With gates it passes, run from the deployment by hand, the newest version is champion.
    request = {"request": {"model_name": MODEL, "challenger": str(newest), "gates": {"min_held_in": 0.0}}}
    prefect(env, "deployment", "run", "promote/promote", "--params", json.dumps(request))
    wait_for_runs(api, "promote", 2)
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(newest)

    # Run by hand with gates it cannot pass: a recorded rejection, the champion stays.
    request = {"request": {"model_name": MODEL, "challenger": "1", "gates": {"min_held_in": 2.0}}}
    prefect(env, "deployment", "run", "promote/promote", "--params", json.dumps(request))
    wait_for_runs(api, "promote", 3)
    assert client.get_model_version(MODEL, "1").tags["mergeflow.promotion.decision"] == "rejected"
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(newest)

    # With approval required, a run on the worker pauses; a person's answer through the API
    # resumes it, and a rejection is recorded without moving the champion.
    lenient = {"min_held_in": 0.0, "max_held_out_drop": 10.0}
    request = {
        "request": {"model_name": MODEL, "challenger": "1", "gates": lenient, "require_approval": True}
    }
    prefect(env, "deployment", "run", "promote/promote", "--params", json.dumps(request))
    paused = wait_for_paused(api, "promote")
    resume(api, paused, {"approve": False, "comment": "held-out table looks off"})
    wait_for_runs(api, "promote", 4)
    tags = client.get_model_version(MODEL, "1").tags
    assert (tags["mergeflow.promotion.approved"], tags["mergeflow.promotion.comment"]) == (
        "false",
        "held-out table looks off",
    )
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(newest)


def test_a_claim_is_redone_only_when_failed_or_stale():
    from flows.on_expert_landed import redo

    now = time.time()
    assert redo({"status": "failed", "started_at": now}, 6)
    assert not redo({"status": "done", "started_at": 0}, 6)
    assert not redo({"status": "running", "started_at": now - 60}, 6)
    assert redo({"status": "running", "started_at": now - 7 * 3600}, 6)


def test_a_version_registered_outside_mergeflow_is_judged_through_the_mlflow_webhook(
    stack, deployed, tmp_path
):
    """`mergeflow webhook relay` + `mergeflow webhook create`: MLflow's signed delivery of a
    new version becomes mergeflow.merge.registered, and the promote deployment judges it."""
    env, api = deployed | {"MERGEFLOW_WEBHOOK_SECRET": secrets.token_hex(16)}, deployed["PREFECT_API_URL"]
    model = "mergeflow-registered-by-hand"
    (port,) = free_ports(1)
    relay_args = ["webhook", "relay", "--port", str(port)]
    with background("mergeflow", relay_args, env, tmp_path / "relay.log") as relay:
        wait_for_health(f"http://127.0.0.1:{port}/health", relay)
        mergeflow_cli(env, "webhook", "create", f"http://127.0.0.1:{port}/mlflow")

        # A delivery not signed with the webhook's secret is refused.
        forged = urllib.request.Request(
            f"http://127.0.0.1:{port}/mlflow",
            data=b'{"entity": "model_version", "action": "created", "data": {}}',
            headers={
                "X-MLflow-Delivery-Id": "x",
                "X-MLflow-Timestamp": str(int(time.time())),
                "X-MLflow-Signature": "v1,AAAA",
            },
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(forged, timeout=10)
        assert refused.value.code == 401

        # Another tool registers a version whose run logged the paper's normalised means.
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment(f"by-hand-{secrets.token_hex(4)}"))
        client.log_metric(run.info.run_id, "held_in_normalised_mean", 0.95)
        client.log_metric(run.info.run_id, "held_out_normalised_mean", 1.01)
        client.set_terminated(run.info.run_id)
        client.create_registered_model(model)
        version = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run.info.run_id)

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            judged = [
                r
                for r in runs_of(api, "promote")
                if r["parameters"].get("request", {}).get("model_name") == model
                and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")
            ]
            if judged:
                break
            time.sleep(2)
        assert [r["state_type"] for r in judged] == ["COMPLETED"], (
            judged,
            (tmp_path / "relay.log").read_text(),
        )
        assert (
            client.get_model_version(model, version.version).tags["mergeflow.promotion.decision"]
            == "promoted"
        )
        assert client.get_model_version_by_alias(model, "champion").version == version.version


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the relay exited with {process.returncode}"
        try:
            get_text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5)
            if get_text.read().strip() == b"ok":
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not healthy within {timeout}s")


# What mergeflow's events carry (tasks/landing.py, mergeflow/webhooks.py, `expert publish`).
SAMPLE_PAYLOADS = {
    "mergeflow.merge.registered": {
        "model_name": "mergeflow-tiny2m-pt",
        "version": 4,
        "source": "mlflow-webhook",
    },
    "mergeflow.expert.landed": {
        "base": "tiny2m-pt",
        "task": "topic",
        "sha256": "ab" * 32,
        "base_model": "s3://b/m",
    },
}


def render_like_prefect(value, payload: dict):
    """A trigger's parameter template rendered as Prefect does: Jinja's native mode, so a value
    that reads as a Python literal (a version number) arrives as that type, not as text."""
    if isinstance(value, dict):
        return {key: render_like_prefect(item, payload) for key, item in value.items()}
    match = re.fullmatch(r"\{\{\s*event\.payload\.(\w+)\s*\}\}", value) if isinstance(value, str) else None
    if not match:
        return value
    rendered = str(payload[match.group(1)])
    try:
        return ast.literal_eval(rendered)
    except (ValueError, SyntaxError):
        return rendered


def test_every_trigger_renders_parameters_its_flow_accepts():
    """The server validates a triggered run's parameters against the flow's schema before the
    run exists; a mismatch only shows as a line in the server's log."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    checked = 0
    for deployment in spec["deployments"]:
        module, name = deployment["entrypoint"].removesuffix(".py").replace("/", ".").split(":")
        flow = getattr(importlib.import_module(module.replace(".py", "")), name)
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        for trigger in deployment.get("triggers", []):
            (event,) = trigger["expect"]
            parameters = render_like_prefect(trigger["parameters"], SAMPLE_PAYLOADS[event])
            assert validate(parameters, schema, ignore_required=False) == [], (deployment["name"], parameters)
            checked += 1
    assert checked == 2
