"""Helpers for tests that run the real stack: a private environment, env.sh, waiting on servers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parent.parent

# Variables from the developer's shell that would point the stack or its clients elsewhere.
FOREIGN_ENV = (
    "AWS_",
    "MLFLOW_",
    "PREFECT_",
    "MERGEFLOW_S3",
    "MERGEFLOW_MLFLOW",
    "MERGEFLOW_PREFECT",
    "MERGEFLOW_HOME",
    "MERGEFLOW_SETTINGS",
    "MERGEFLOW_BUCKET",
)


def stack_env(home: Path, ports: list[int]) -> dict[str, str]:
    """Environment selecting a private stack: state folder and ports, nothing from the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env["MERGEFLOW_HOME"] = str(home)
    for name, port in zip(("S3", "MLFLOW", "PREFECT"), ports, strict=True):
        env[f"MERGEFLOW_{name}_PORT"] = str(port)
    return env


def sourced(env_file: Path, env: dict[str, str]) -> dict[str, str]:
    """The variables a shell has after `source env_file`."""
    out = subprocess.run(
        ["bash", "-c", 'source "$1" && env -0', "bash", str(env_file)],
        env=env,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _direct.open(request, timeout=10) as response:
        return json.loads(response.read())


def command(program: str, env: dict, *args: str, timeout: float = 300) -> str:
    """Run one of the venv's commands (prefect, mergeflow) from the repository root."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / program), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def prefect(env: dict, *args: str) -> str:
    return command("prefect", env, *args)


def mergeflow_cli(env: dict, *args: str) -> str:
    return command("mergeflow", env, *args)


def runs_of(api: str, deployment: str) -> list[dict]:
    (found,) = [d for d in get_json(f"{api}/deployments/filter", {}) if d["name"] == deployment]
    return get_json(f"{api}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [found["id"]]}}})


def wait_for_runs(api: str, deployment: str, count: int, timeout: float = 600) -> list[dict]:
    """The deployment's runs once `count` of them are final; fails on a failed run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = runs_of(api, deployment)
        final = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        assert all(r["state_type"] == "COMPLETED" for r in final), [
            (r["name"], r["state_name"]) for r in final
        ]
        if len(final) >= count:
            return runs
        time.sleep(2)
    raise AssertionError(
        f"{deployment}: {count} finished run(s) expected within {timeout}s; got {runs_of(api, deployment)}"
    )


def merge_runs(api: str) -> list[str]:
    """Ids of every merge-and-evaluate run (the subflows merge-on-landing launches)."""
    runs = get_json(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["merge-and-evaluate"]}}})
    return sorted(r["id"] for r in runs)


def with_env(env: dict, function, *args):
    """Call `function` with the stack's S3 settings in os.environ."""
    keys = ("MERGEFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: env[key] for key in keys})
    try:
        return function(*args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def background(program: str, args: list[str], env: dict, log_path: Path):
    """One of the venv's commands running in its own process group, its output in `log_path`;
    stopped (the whole group) on leaving: SIGTERM, then SIGKILL after 30 s (a Prefect worker
    told to stop while a scheduled run starts has been seen to take longer)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / program), *args],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
