"""The pipeline end to end on real servers: `mergeflow stack up` (SeaweedFS; an MLflow server
whose artifacts go to S3; a Prefect server), the micro zoo published to S3 by publish_zoo, then
merge_and_evaluate run by separate processes, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from mlflow import MlflowClient
from stack_helpers import get_json

from mergeflow.registry import load_registered


def run_flow(module: str, request: dict, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{module}-request.json"
    path.write_text(json.dumps(request))
    return subprocess.run(
        [sys.executable, "-m", f"flows.{module}", str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def outcome_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout[proc.stdout.index("{\n") :])


def objects(s3, bucket: str, prefix: str) -> dict[str, str]:
    """Key → ETag of every object under prefix."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] + str(o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def test_publish_merge_evaluate_register_on_real_servers(stack, tmp_path):
    settings, env, s3 = stack
    bucket = settings.bucket

    published = outcome_of(run_flow("publish_zoo", {"preset": "micro-test"}, env, tmp_path))
    family = published["families"]["tinymicro-it-trained-here"]
    assert family["base"].startswith(f"s3://{bucket}/zoo/micro-test/")
    keys = objects(s3, bucket, "zoo/")
    assert "zoo/micro-test.json" in keys
    assert (
        f"{family['experts']['text_genre'].removeprefix(f's3://{bucket}/')}/mergeflow-manifest.json" in keys
    )
    # Publishing again uploads nothing.
    outcome_of(run_flow("publish_zoo", {"preset": "micro-test"}, env, tmp_path))
    assert {k: v for k, v in objects(s3, bucket, "zoo/").items() if k != "zoo/micro-test.json"} == {
        k: v for k, v in keys.items() if k != "zoo/micro-test.json"
    }

    request = {
        "base": family["base"],
        "base_family": "tinymicro-it",
        "experts": family["experts"],
        "method": "ties",
        "parameters": {"density": 0.5, "lambda": 1.0},
        "held_out": ["part_of_speech"],
        "split": "validation",
    }
    first = outcome_of(run_flow("merge_and_evaluate", request, env, tmp_path))

    # S3: task vector, merged shards and manifest, score table.
    merged_prefix = first["merged"].removeprefix(f"s3://{bucket}/")
    assert merged_prefix.startswith("merged/tinymicro-it/ties-")
    stored = objects(s3, bucket, "")
    assert f"{merged_prefix}/mergeflow-manifest.json" in stored
    assert f"{merged_prefix}/model.safetensors" in stored and f"{merged_prefix}.scores.csv" in stored
    assert any(key.startswith("task-vectors/") and key.endswith("mergeflow-manifest.json") for key in stored)

    # Prefect server: the run completed.
    api = env["PREFECT_API_URL"]
    run = get_json(f"{api}/flow_runs/{first['flow_run_id']}")
    assert run["state_type"] == "COMPLETED"
    only_this_run = {"key": {"any_": ["merge-report"]}, "flow_run_id": {"any_": [first["flow_run_id"]]}}
    (artifact,) = get_json(f"{api}/artifacts/filter", {"artifacts": only_this_run})
    assert f"{env['MLFLOW_TRACKING_URI']}/#/experiments/" in artifact["data"]
    assert first["merged"] in artifact["data"] and "| text_genre | held_in |" in artifact["data"]

    # MLflow server: metrics, tags, a registered version that loads back from S3 through it.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    logged = client.get_run(first["run_id"])
    assert logged.data.params["method"] == "ties"
    assert {"normalised/text_genre", "raw/part_of_speech", "held_in_normalised_mean"} <= set(
        logged.data.metrics
    )
    assert logged.data.tags["mergeflow.prefect_flow_run_id"] == first["flow_run_id"]
    assert logged.data.tags["mergeflow.output_uri"] == first["merged"]
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert any(key.startswith("mlflow/") and key.endswith("model/model.safetensors") for key in stored)
    loaded = load_registered(
        first["model_name"], first["model_version"], env["MLFLOW_TRACKING_URI"], tmp_path / "loaded"
    )
    assert (loaded / "model.safetensors").is_file()

    # A second identical run recomputes nothing: scores cached, no object rewritten, same version.
    second = outcome_of(run_flow("merge_and_evaluate", request, env, tmp_path))
    task_runs = get_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [second["flow_run_id"]]}}})
    scores = {r["name"]: r["state_name"] for r in task_runs if r["name"].startswith("score-")}
    assert scores and set(scores.values()) == {"Cached"}, scores
    assert {k: v for k, v in objects(s3, bucket, "").items() if not k.endswith(".scores.csv")} == {
        k: v for k, v in stored.items() if not k.endswith(".scores.csv")
    }
    assert (second["model_version"], second["run_id"]) == (first["model_version"], first["run_id"])

    # A missing expert fails the run with a clear message and registers nothing more.
    missing = request | {"experts": {"text_genre": f"s3://{bucket}/zoo/no-such-expert"}}
    failed = run_flow("merge_and_evaluate", missing, env, tmp_path)
    assert failed.returncode != 0
    assert "s3://mergeflow/zoo/no-such-expert: no such model" in failed.stdout + failed.stderr
    assert len(client.search_model_versions("name='mergeflow-tinymicro-it'")) == 1


SAVE_SECRETS = """
import os, sys
from prefect.blocks.system import Secret
from tasks.credentials import secret_block_name
for variable in sys.argv[1:]:
    Secret(value=os.environ[variable]).save(secret_block_name(variable), overwrite=True)
"""
DELETE_SECRETS = """
import sys
from prefect.client.orchestration import get_client
from tasks.credentials import secret_block_name
with get_client(sync_client=True) as client:
    for variable in sys.argv[1:]:
        block = client.read_block_document_by_name(secret_block_name(variable), "secret")
        client.delete_block_document(block.id)
"""


def test_a_flow_without_credentials_in_its_environment_reads_them_from_secret_blocks(stack, tmp_path):
    settings, env, s3 = stack
    names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    subprocess.run([sys.executable, "-c", SAVE_SECRETS, *names], env=env, cwd=ROOT, check=True, timeout=120)
    try:
        bare = {k: v for k, v in env.items() if k not in names}
        request = {"preset": "micro-test", "artifacts": f"s3://{settings.bucket}/from-secret-blocks"}
        proc = run_flow("publish_zoo", request, bare, tmp_path)
        published = outcome_of(proc)
    finally:
        subprocess.run([sys.executable, "-c", DELETE_SECRETS, *names], env=env, cwd=ROOT, timeout=120)
    assert published["families"]["tinymicro-it-trained-here"]["base"].startswith(
        f"s3://{settings.bucket}/from-secret-blocks/"
    )
    assert "from-secret-blocks/zoo/micro-test.json" in objects(s3, settings.bucket, "from-secret-blocks/")
    output = proc.stdout + proc.stderr
    assert "credentials from Secret blocks: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in output
    assert env["AWS_SECRET_ACCESS_KEY"] not in output
