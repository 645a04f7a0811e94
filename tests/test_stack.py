"""`mergeflow stack` and its settings, with real servers (SeaweedFS, MLflow, Prefect) on loopback.

Every test uses its own state folder (MERGEFLOW_HOME) under tmp_path and ports chosen free
here; the `stack_settings` fixture stops whatever a test started, so no server outlives a
failing test.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from s3_server import free_ports
from stack_helpers import FOREIGN_ENV, get_json, sourced, stack_env
from typer.testing import CliRunner

from mergeflow.cli import app
from mergeflow.settings import Settings, SettingsError, env_names, load_settings
from mergeflow.stack import S3Credentials, S3Service, StackError, down, s3_client, status, up
from mergeflow.stack.processes import group_alive, port_is_free
from mergeflow.stack.seaweed import socket_folder
from mergeflow.stack.services import PrefectService

DOCS = Path(__file__).parent.parent / "docs" / "stack.md"


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(FOREIGN_ENV):
            monkeypatch.delenv(name)


@pytest.fixture
def stack_settings(tmp_path, clean_env):
    """Makes Settings for a private stack under tmp_path; stops whatever it started afterwards,
    whether the test passed or not."""
    made: list[Settings] = []

    def make(**fields) -> Settings:
        settings = Settings(home=tmp_path / "home", **fields)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        down(settings)


def mergeflow_cli() -> str:
    script = Path(sys.executable).parent / "mergeflow"
    return str(script) if script.exists() else shutil.which("mergeflow") or "mergeflow"


def no_server_left(settings: Settings, pids: list[int]) -> None:
    for pid in pids:
        assert not group_alive(pid), f"process group {pid} still alive"
    for port in (settings.s3_port, settings.mlflow_port, settings.prefect_port):
        assert port_is_free(port), f"port {port} still taken"


# --- the whole stack ---------------------------------------------------------------------


def test_stack_up_use_status_idempotent_down(tmp_path, stack_settings):
    ports = free_ports(3)
    settings = stack_settings(s3_port=ports[0], mlflow_port=ports[1], prefect_port=ports[2])
    home = settings.home
    env = stack_env(home, ports)
    # Started by a separate process: the servers must outlive the command that started them.
    proc = subprocess.run(
        [mergeflow_cli(), "stack", "up"], env=env, capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for title, port in zip(("SeaweedFS S3", "MLflow", "Prefect"), ports, strict=True):
        assert f"{title} started in" in output and f"http://127.0.0.1:{port}" in output, output

    s3_folder = home / "stack" / "s3"
    secret = (s3_folder / "secret-access-key").read_text().strip()
    assert stat.S_IMODE((s3_folder / "secret-access-key").stat().st_mode) == 0o600
    assert secret not in output
    for log in home.glob("stack/*/*.log"):
        assert secret not in log.read_text(errors="replace"), log

    # `source env.sh` gives clients everything, the keys read from their files.
    client_env = sourced(home / "stack" / "env.sh", env)
    assert client_env["AWS_SECRET_ACCESS_KEY"] == secret
    assert client_env["MERGEFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{ports[0]}"
    assert client_env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports[1]}"
    assert client_env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports[2]}/api"

    s3 = s3_client(
        client_env["MERGEFLOW_S3_ENDPOINT_URL"],
        S3Credentials(client_env["AWS_ACCESS_KEY_ID"], client_env["AWS_SECRET_ACCESS_KEY"]),
    )
    s3.put_object(Bucket=settings.bucket, Key="hello.txt", Body=b"hello stack")
    assert s3.get_object(Bucket=settings.bucket, Key="hello.txt")["Body"].read() == b"hello stack"

    check_mlflow_logs_through_the_server_into_s3(client_env, s3, settings.bucket, tmp_path)
    check_prefect_runs_a_flow(client_env, tmp_path)

    statuses = status(settings)
    assert [(s.name, s.running, s.healthy) for s in statuses] == [
        ("s3", True, True),
        ("mlflow", True, True),
        ("prefect", True, True),
    ]
    pids = [s.pid for s in statuses]
    for s in statuses:
        assert (home / "stack" / s.name / f"{s.name}.pid").read_text().strip() == str(s.pid)

    again = CliRunner().invoke(app, ["stack", "up"], env=env)
    assert again.exit_code == 0, again.output
    assert again.output.count("already running") == 3 and "started in" not in again.output
    assert [s.pid for s in status(settings)] == pids

    shown = CliRunner().invoke(app, ["stack", "status"], env=env)
    assert shown.exit_code == 0 and shown.output.count("running  healthy") == 3, shown.output
    assert secret not in shown.output and "export AWS_SECRET_ACCESS_KEY=" in shown.output

    stopped = CliRunner().invoke(app, ["stack", "down"], env=env)
    assert stopped.exit_code == 0 and stopped.output.count("stopped (pid") == 3, stopped.output
    no_server_left(settings, pids)
    assert [(s.running, s.pid) for s in status(settings)] == [(False, None)] * 3
    assert list(home.glob("stack/*/*.pid")) == [] and not (home / "stack" / "env.sh").exists()
    shown = CliRunner().invoke(app, ["stack", "status"], env=env)
    assert shown.output.count("stopped") == 3 and "export" not in shown.output


def check_mlflow_logs_through_the_server_into_s3(client_env: dict, s3, bucket: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=client_env["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("stack-test")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "loss", 0.25)
    artifact = tmp_path / "notes.txt"
    artifact.write_text("merged well")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)

    logged = client.get_run(run.info.run_id)
    assert logged.data.metrics == {"loss": 0.25}
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:/"), "artifacts must go through the server"
    key = f"mlflow/{experiment}/{run.info.run_id}/artifacts/notes.txt"
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
    assert key in listed, listed
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"merged well"


def check_prefect_runs_a_flow(client_env: dict, tmp_path: Path) -> None:
    api = client_env["PREFECT_API_URL"]
    assert get_json(f"{api}/health") is True
    script = textwrap.dedent(
        """
        from prefect import flow

        @flow(name="stack-test-flow")
        def add_one(x: int) -> int:
            return x + 1

        print("result", add_one(41))
        """
    )
    env = {**client_env, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0 and "result 42" in proc.stdout, proc.stdout + proc.stderr
    runs = get_json(f"{api}/flow_runs/filter", {})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]


# --- failures ----------------------------------------------------------------------------


def test_port_in_use_is_named_and_nothing_starts(stack_settings):
    ports = free_ports(3)
    settings = stack_settings(s3_port=ports[0], mlflow_port=ports[1], prefect_port=ports[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", ports[2]))
        squatter.listen()
        with pytest.raises(StackError) as err:
            up(settings)
        message = str(err.value)
        assert str(ports[2]) in message and "Prefect" in message
        assert "MERGEFLOW_PREFECT_PORT" in message and "--prefect-port" in message

        result = CliRunner().invoke(app, ["stack", "up"], env=stack_env(settings.home, ports))
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: port") and str(ports[2]) in lines[0]
    assert list(settings.home.glob("stack/*/*.pid")) == [], "a refused `up` must start nothing"


def test_same_port_for_two_services_is_refused(stack_settings):
    (port,) = free_ports(1)
    with pytest.raises(StackError, match=f"both set to port {port}"):
        up(stack_settings(s3_port=port, mlflow_port=port), ["mlflow"])


def test_failed_start_names_the_service_shows_its_log_and_leaves_nothing(stack_settings):
    (port,) = free_ports(1)
    settings = stack_settings(s3_port=port)
    folder = S3Service(settings).folder
    folder.mkdir(parents=True)
    (folder / "data").write_text("a file where SeaweedFS wants its data folder")
    with pytest.raises(StackError) as err:
        up(settings, ["s3"], timeout=30)
    message = str(err.value)
    assert message.startswith("SeaweedFS S3 exited with code") and str(folder / "s3.log") in message
    assert "weed mini" in message, "the log tail shows the command line"
    assert not (folder / "s3.pid").exists() and port_is_free(port)


def test_health_timeout_names_the_service_and_stops_what_it_started(stack_settings):
    # Prefect takes several seconds to import and migrate: it cannot be healthy within 1 s.
    ports = free_ports(2)
    settings = stack_settings(s3_port=ports[0], prefect_port=ports[1])
    messages: list[str] = []
    with pytest.raises(StackError) as err:
        up(settings, ["prefect"], timeout=1, report=messages.append)
    message = str(err.value)
    assert message.startswith(f"Prefect not healthy at http://127.0.0.1:{ports[1]} after 1s")
    assert "prefect server start" in message, "the log tail shows the command line"
    service = PrefectService(settings)
    assert not service.pid_file.exists() and not service.run_file.exists()
    (started,) = messages
    pid = int(re.search(r"\(pid (\d+)\)", started).group(1))
    assert not group_alive(pid) and port_is_free(ports[1])


def test_stale_pid_file_is_cleaned(stack_settings):
    settings = stack_settings()
    service = S3Service(settings)
    service.folder.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    service.pid_file.write_text(f"{gone.pid}\n")
    assert [s.running for s in status(settings)] == [False, False, False]
    assert not service.pid_file.exists()

    service.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not a SeaweedFS server
    messages: list[str] = []
    down(settings, report=messages.append)
    assert "SeaweedFS S3 was not running (removed a stale pid file)" in messages
    assert not service.pid_file.exists()


def test_long_state_folders_keep_unix_sockets_short(tmp_path):
    long_folder = tmp_path / ("x" * 120) / "stack" / "s3"
    sockets = socket_folder(long_folder)
    assert len(str(sockets / "filer.sock")) <= 100 and sockets.is_dir()
    assert socket_folder(long_folder) == sockets, "the same state folder always gets the same place"
    assert socket_folder(tmp_path) == tmp_path
    sockets.rmdir()


# --- settings ----------------------------------------------------------------------------


def test_settings_precedence_env_over_file_over_defaults(tmp_path, monkeypatch, clean_env):
    monkeypatch.chdir(tmp_path)
    defaults = load_settings()
    assert (defaults.bucket, defaults.s3_port, defaults.mlflow_port, defaults.prefect_port) == (
        "mergeflow",
        8333,
        5000,
        4200,
    )
    assert defaults.prefect_api_url is None and defaults.s3_endpoint_url is None

    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path / "state"))
    (tmp_path / "mergeflow.toml").write_text('bucket = "from-file"\ns3_port = 9000\nmlflow_port = 5001\n')
    monkeypatch.setenv("MERGEFLOW_S3_PORT", "9100")
    settings = load_settings()
    assert settings.bucket == "from-file" and settings.mlflow_port == 5001
    assert settings.s3_port == 9100, "the environment wins over the file"
    assert load_settings(s3_port=9200).s3_port == 9200, "explicit values (CLI options) win over both"
    assert settings.home == tmp_path / "state"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"

    other = tmp_path / "elsewhere.toml"
    other.write_text('prefect_api_url = "http://127.0.0.1:4300/api"\nhome = "/srv/mergeflow"\n')
    monkeypatch.setenv("MERGEFLOW_SETTINGS", str(other))
    monkeypatch.delenv("MERGEFLOW_HOME")
    settings = load_settings()
    assert settings.prefect_api_url == "http://127.0.0.1:4300/api" and settings.bucket == "mergeflow"
    assert settings.home == Path("/srv/mergeflow")


def test_settings_read_the_tools_own_variables_and_hide_secrets(monkeypatch, tmp_path, clean_env):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-endpoint:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    settings = load_settings()
    assert settings.home == tmp_path / "user" / ".mergeflow", "HOME is not MERGEFLOW_HOME"
    assert settings.s3_endpoint_url == "http://aws-endpoint:9000"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.prefect_api_url == "http://prefect:4200/api"
    assert "very-secret-value" not in repr(settings) and "AKIDEXAMPLE" not in repr(settings)
    monkeypatch.setenv("MERGEFLOW_S3_ENDPOINT_URL", "http://seaweed:8333")
    assert load_settings().s3_endpoint_url == "http://seaweed:8333", "mergeflow's own variable wins"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"MERGEFLOW_S3_PORT": "70000"}, "s3_port (MERGEFLOW_S3_PORT)"),
        ({"MERGEFLOW_BUCKET": "Bad_Bucket"}, "bucket (MERGEFLOW_BUCKET): 'Bad_Bucket' is not a valid"),
        ({"file": "s3_prot = 1\n"}, "s3_prot: Extra inputs are not permitted"),
        ({"file": "bucket = [\n"}, "invalid TOML"),
        (
            {"file": 'aws_secret_access_key = "very-secret-value"\n'},
            "aws_secret_access_key cannot be set in the settings file: credentials are read from the "
            "environment",
        ),
        ({"MERGEFLOW_SETTINGS": "/nonexistent/mergeflow.toml"}, "no such settings file"),
    ],
)
def test_invalid_settings_are_one_clear_error(monkeypatch, tmp_path, clean_env, source, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    for name, value in source.items():
        if name == "file":
            (tmp_path / "mergeflow.toml").write_text(value)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert expected in str(err.value) and "very-secret-value" not in str(err.value)
    assert "\n" not in str(err.value)


def test_docs_list_every_setting_with_its_variables():
    text = DOCS.read_text()
    for field in Settings.model_fields:
        names = " or ".join(f"`{name}`" for name in env_names(field))
        assert f"| {names} | `{field}` |" in text, f"docs/stack.md: no settings row for {field}"


@pytest.mark.parametrize("command", [["stack"], ["stack", "up"], ["stack", "down"], ["stack", "status"]])
def test_stack_commands_have_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
