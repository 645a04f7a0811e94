"""infra/: the docker-compose stack is valid against the Compose specification (the JSON schema
docker-compose 1.29.2 ships, fetched from PyPI and pinned by hash) and describes the same
services, ports, bucket and settings as `mergeflow stack`, which is the path tested with real
servers. These machines have no Docker daemon, so nothing here starts a container."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from mergeflow.settings import Settings, env_names

INFRA = Path(__file__).parent.parent / "infra"
WHEEL = "docker_compose-1.29.2-py2.py3-none-any.whl"
WHEEL_SHA256 = "8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809"


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    folder = Path.home() / ".cache" / "mergeflow" / "test-data"
    wheel = folder / WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "docker-compose==1.29.2",
                "-d",
                str(folder),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == WHEEL_SHA256
    with zipfile.ZipFile(wheel) as archive:
        return json.loads(archive.read("compose/config/compose_spec.json"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_compose_specification(compose, compose_schema):
    # The file names draft 2019-09 by a URL jsonschema does not recognise; that is its draft.
    validator = jsonschema.Draft201909Validator(compose_schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # And the validator does refuse a broken file.
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "whenever"
    assert list(validator.iter_errors(broken))


def test_compose_has_the_stack_services_bound_to_loopback(compose):
    services = compose["services"]
    assert set(services) >= {
        "postgres",
        "minio",
        "create-bucket",
        "mlflow",
        "prefect-server",
        "prefect-worker",
    }
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if name not in ("create-bucket",):
            assert "healthcheck" in service or name == "prefect-worker", f"{name} has no health check"


def default_of(text: str, variable: str) -> str:
    match = re.search(r"\$\{" + variable + r":-([^}]*)\}", text)
    assert match, f"{variable} has no default in docker-compose.yml"
    return match.group(1)


def test_compose_uses_mergeflows_settings_and_defaults(compose):
    text = (INFRA / "docker-compose.yml").read_text()
    for field in ("s3_port", "mlflow_port", "prefect_port", "bucket"):
        (variable,) = env_names(field)
        assert default_of(text, variable) == str(Settings.model_fields[field].default), field
    # MLflow's artifacts go where the stack's do.
    command = " ".join(compose["services"]["mlflow"]["command"])
    assert "--artifacts-destination s3://${MERGEFLOW_BUCKET:-mergeflow}/mlflow" in command


def test_env_example_sets_only_known_settings_and_secrets():
    names = [
        line.split("=", 1)[0]
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    known = {name for field in Settings.model_fields for name in env_names(field)}
    # Credentials are not settings (they come from the environment or Secret blocks).
    secrets = {
        "POSTGRES_PASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
    }
    assert set(names) - known == secrets
    text = (INFRA / "docker-compose.yml").read_text()
    for name in names:
        assert "${" + name in text, f"{name} in .env.example is not used by docker-compose.yml"
