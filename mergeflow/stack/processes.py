"""Background server processes: start detached, track by pid file, stop by process group.

Each server runs in its own session (so it outlives the command that started it and never
gets the terminal's hang-up), and so in its own process group: stopping the group also stops
the workers a server forks (uvicorn workers, SeaweedFS's sub-servers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from mergeflow.errors import MergeflowError

HOST = "127.0.0.1"
LOG_TAIL_LINES = 30

# Servers started by this Python process. Keeping the Popen lets us collect a server's exit
# status once it ends, so it does not linger as a zombie that still looks alive to kill(pid, 0),
# and Python does not warn about a dropped, still-running child.
_children: dict[int, subprocess.Popen] = {}


class StackError(MergeflowError):
    """A stack service could not be started, checked or stopped."""


def port_is_free(port: int) -> bool:
    """Whether a server could bind `port` on 127.0.0.1 now (with SO_REUSEADDR, as servers do,
    so a port in TIME_WAIT after our own server stopped still counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def start_detached(command: list[str], env: dict[str, str], cwd: Path, log_file: Path) -> int:
    """Start `command` in a new session with stdout and stderr appended to `log_file`; return its pid.

    The previous run's log is kept as `<log>.1`, so a failing start shows only its own lines.
    Only the command line is written to the log, never the environment (it holds credentials).
    """
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))
    with open(log_file, "wb") as log:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"# {stamp} {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[process.pid] = process
    return process.pid


def exit_code(pid: int) -> int | None:
    """The exit code of a server this process started and that has ended, else None."""
    process = _children.get(pid)
    return None if process is None else process.poll()


def is_running(pid: int, marker: str) -> bool:
    """Whether `pid` is a live process whose command line contains `marker`.

    The marker guards against a stale pid file whose pid now belongs to another program
    (checked where /proc exists; elsewhere a live pid is taken as ours).
    """
    if exit_code(pid) is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a server we started
    proc = Path("/proc") / str(pid)
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return marker in (proc / "cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return True


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies don't count: in a container whose
    init does not reap orphans they would otherwise make a stopped server look alive forever."""
    exit_code(pgid)  # collect our own child's status first
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                _children.pop(pgid, None)
                return
            time.sleep(0.1)
    raise StackError(f"process group {pgid} is still alive after SIGKILL")


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600 from creation, never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def log_tail(log_file: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log_file.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text)
