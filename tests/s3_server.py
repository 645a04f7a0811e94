"""A real S3 server for tests: the stack's SeaweedFS (mergeflow.stack, service "s3") alone on
loopback, with its data, log and generated credentials in a throwaway folder.

Plain functions, no pytest: `start_s3_server(workdir)` returns a running `S3Server`;
`server.stop()` ends it. Requests signed with any key but the server's are refused.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.settings import Settings
from mergeflow.stack import S3Credentials, S3Service, StackError, down, s3_client, up

START_ATTEMPTS = 3


@dataclass
class S3Server:
    endpoint: str
    credentials: S3Credentials = field(repr=False)
    settings: Settings = field(repr=False)

    @property
    def access_key(self) -> str:
        return self.credentials.access_key

    @property
    def secret_key(self) -> str:
        return self.credentials.secret_key

    @property
    def log_path(self) -> Path:
        return S3Service(self.settings).log_file

    def client(self, secret_key: str | None = None):
        """A botocore S3 client for this server (optionally signing with another secret)."""
        return s3_client(self.endpoint, S3Credentials(self.access_key, secret_key or self.secret_key))

    def stop(self) -> None:
        down(self.settings, ["s3"])


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (all bound at once, then released): asking for
    one port at a time can hand out the same port twice."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_s3_server(workdir: str | Path, timeout: float = 60.0) -> S3Server:
    """Start SeaweedFS with its state under `workdir` and wait until it accepts a signed write.
    Retries with another port if the chosen one was taken meanwhile."""
    last_error: StackError | None = None
    for _ in range(START_ATTEMPTS):
        settings = Settings(home=Path(workdir), s3_port=free_ports(1)[0])
        try:
            (status,) = up(settings, ["s3"], timeout=timeout)
            return S3Server(status.url, S3Service(settings).credentials(), settings)
        except StackError as exc:  # most likely the port was taken between choosing and binding
            last_error = exc
    assert last_error is not None
    raise last_error
