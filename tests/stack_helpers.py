"""Helpers for tests that run the real stack: free ports, a private environment, env.sh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

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


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (all bound at once, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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
