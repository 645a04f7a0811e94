"""The stack's three services: how each is started, checked for health and used.

Each service keeps everything under `<home>/stack/<name>/`: its log, pid file, run record
and data (SeaweedFS's volumes, MLflow's and Prefect's sqlite databases).
"""

from __future__ import annotations

import base64
import importlib.util
import os
import secrets
import shlex
import sys
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from mergeflow.settings import Settings
from mergeflow.stack import seaweed
from mergeflow.stack.processes import HOST, StackError, write_private

# Environment variable prefixes a server must not inherit from the user's shell: they would
# point it at another database, S3 account or API than the stack's own.
FOREIGN_ENV = ("AWS_", "MLFLOW_", "PREFECT_", "MERGEFLOW_", "S3_")
# Talk to 127.0.0.1 directly even when the shell has an HTTP proxy configured.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stack_dir(settings: Settings) -> Path:
    return settings.home / "stack"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(FOREIGN_ENV)}
    env.update(extra)
    return env


def http_probe(url: str, expected: str) -> Callable[[], None]:
    """A probe that GETs `url` and raises unless it answers 200 with `expected` in the body."""

    def probe() -> None:
        with _direct.open(url, timeout=2) as response:
            body = response.read(200).decode(errors="replace")
        if expected not in body:
            raise RuntimeError(f"GET {url} answered {body!r}")

    return probe


class Service(ABC):
    """One background server of the stack, configured from Settings."""

    name: ClassVar[str]
    title: ClassVar[str]
    # A word in the server's command line: tells our server from another program that
    # happens to have the pid of a stale pid file.
    marker: ClassVar[str]
    # Services this one uses; `up` starts them too.
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: Settings):
        self.settings = settings

    @property
    def port(self) -> int:
        return getattr(self.settings, f"{self.name}_port")

    @property
    def port_hint(self) -> str:
        return f"MERGEFLOW_{self.name.upper()}_PORT or --{self.name}-port"

    @property
    def folder(self) -> Path:
        return stack_dir(self.settings) / self.name

    @property
    def log_file(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.folder / f"{self.name}.pid"

    @property
    def run_file(self) -> Path:
        """JSON record of the running server: pid, port, start time."""
        return self.folder / f"{self.name}.run.json"

    def url(self, port: int) -> str:
        return f"http://{HOST}:{port}"

    @abstractmethod
    def launch(self) -> tuple[list[str], dict[str, str]]:
        """Prepare the server's files; return its command line and environment."""

    @abstractmethod
    def probe(self, port: int, starting: bool = False) -> Callable[[], None]:
        """A callable that returns when the server on `port` is healthy and raises otherwise.
        `starting`: the check `up` waits for, which may also prepare the service for use."""

    @abstractmethod
    def exports(self, port: int) -> dict[str, str]:
        """Shell-ready values (already quoted) of the variables a client needs for this service."""


class S3Service(Service):
    name = "s3"
    title = "SeaweedFS S3"
    marker = "weed"

    def credentials(self) -> seaweed.S3Credentials:
        return seaweed.load_or_create_credentials(self.folder)

    def launch(self) -> tuple[list[str], dict[str, str]]:
        identities = self.folder / "identities.json"
        seaweed.write_identities(identities, self.credentials())
        ports = seaweed.internal_ports(
            avoid={self.settings.mlflow_port, self.settings.prefect_port, self.port}
        )
        return seaweed.weed_command(self.folder, self.port, ports, identities), clean_env()

    def probe(self, port: int, starting: bool = False) -> Callable[[], None]:
        client = seaweed.s3_client(self.url(port), self.credentials())
        if starting:
            return lambda: seaweed.ensure_bucket_writable(client, self.settings.bucket)
        # A signed read: the credentials work and the bucket exists; status changes nothing.
        return lambda: client.head_bucket(Bucket=self.settings.bucket)

    def exports(self, port: int) -> dict[str, str]:
        key_file, secret_file = seaweed.credential_files(self.folder)
        endpoint = shlex.quote(self.url(port))
        return {
            "MERGEFLOW_S3_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            # References, not values: the keys are read from their 0600 files when sourced.
            "AWS_ACCESS_KEY_ID": f'"$(cat {shlex.quote(str(key_file))})"',
            "AWS_SECRET_ACCESS_KEY": f'"$(cat {shlex.quote(str(secret_file))})"',
            "MERGEFLOW_BUCKET": shlex.quote(self.settings.bucket),
        }


class MlflowService(Service):
    name = "mlflow"
    title = "MLflow"
    marker = "mlflow"
    needs = ("s3",)

    def launch(self) -> tuple[list[str], dict[str, str]]:
        # Checked here because the server would start without it and fail only at the first
        # artifact upload, with an HTTP 500.
        if importlib.util.find_spec("boto3") is None:
            raise StackError("MLflow needs boto3 to keep artifacts in S3: pip install boto3")
        self.folder.mkdir(parents=True, exist_ok=True)
        s3 = S3Service(self.settings)
        credentials = s3.credentials()
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            # One worker (default 4): a local server needs no more, and each costs ~250 MB.
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            # Clients upload artifacts through the server (mlflow-artifacts:/), which stores
            # them in S3: clients need no S3 credentials.
            "--serve-artifacts",
            "--artifacts-destination",
            f"s3://{self.settings.bucket}/mlflow",
        ]
        env = clean_env(
            AWS_ACCESS_KEY_ID=credentials.access_key,
            AWS_SECRET_ACCESS_KEY=credentials.secret_key,
            MLFLOW_S3_ENDPOINT_URL=s3.url(s3.port),
            # MLflow 3 starts a huey job runner (GenAI scorers, prompt optimisation) by
            # default; mergeflow uses none of it, and it is one more process.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            # Webhooks (`mergeflow webhook create`) reach the relay on this machine: MLflow
            # allows only https to public addresses unless told otherwise. Everything here is
            # on 127.0.0.1. The key keeps stored webhook secrets readable across restarts; the
            # short cache lets a new webhook take effect within seconds (default 60 s).
            MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
            MLFLOW_WEBHOOK_CACHE_TTL="5",
            MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
            MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=self.webhook_encryption_key(),
        )
        return command, env

    def webhook_encryption_key(self) -> str:
        """A Fernet key, generated once and kept in a 0600 file of the service's folder."""
        path = self.folder / "webhook-encryption-key"
        if path.is_file():
            return path.read_text().strip()
        key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        write_private(path, key + "\n")
        return key

    def probe(self, port: int, starting: bool = False) -> Callable[[], None]:
        return http_probe(f"{self.url(port)}/health", "OK")

    def exports(self, port: int) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": shlex.quote(self.url(port))}


class PrefectService(Service):
    name = "prefect"
    title = "Prefect"
    marker = "prefect"

    def launch(self) -> tuple[list[str], dict[str, str]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]
        env = clean_env(
            # Prefect's own home (profiles, sqlite database prefect.db) inside the stack folder.
            PREFECT_HOME=str(self.folder / "home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="true",
            # A run queued behind a deployment's concurrency limit asks again after this long
            # (default 30 s): a burst of landings drains in a few minutes, not ten.
            PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="5",
        )
        return command, env

    def probe(self, port: int, starting: bool = False) -> Callable[[], None]:
        return http_probe(f"{self.url(port)}/api/health", "true")

    def exports(self, port: int) -> dict[str, str]:
        return {"PREFECT_API_URL": shlex.quote(f"{self.url(port)}/api")}


SERVICE_TYPES: dict[str, type[Service]] = {
    cls.name: cls for cls in (S3Service, MlflowService, PrefectService)
}
SERVICE_NAMES = tuple(SERVICE_TYPES)
