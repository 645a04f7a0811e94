"""Folders for one process's intermediate files, named with its process id and host, so that
those a killed process leaves are removed when the next process on that host makes one: a
merge's scratch folder under the cache folder (adapted tensors, converted pickles, an S3
output's staged files), a local output's staging folder beside the output, downloads and zoo
builds being staged. A killed merge never leaves anything that looks complete; this keeps it
from leaving disk used either. The host is part of the name because these folders can sit on
a filesystem several machines share, where another host's live process looks gone."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from mergeflow.file_hashes import cache_dir
from mergeflow.write_lock import process_runs

# This machine, in names: a short digest, since host names may hold '-', the separator.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def new_scratch_folder(kind: str) -> Path:
    """A new, empty folder of this process under the cache folder (on disk: /tmp may be memory,
    and what goes here can be as large as a model). The caller removes it."""
    root = cache_dir() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root, "*")
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}.{HOST}-", dir=root))


def staging_folder(target: Path) -> Path:
    """A new folder `.NAME.partial-PID.HOST-RANDOM` beside `target` (whose parent exists), to
    build `target` in and rename into place when complete; first removes those that gone
    processes left for the same target."""
    remove_abandoned(target.parent, f".{glob.escape(target.name)}.partial-*")
    stage = target.parent / process_tagged(f".{target.name}.partial")
    stage.mkdir()
    return stage


def process_tagged(prefix: str, pid: int | None = None) -> str:
    """A name `prefix-PID.HOST-RANDOM` for a file or folder of this process (or of `pid`)."""
    return f"{prefix}-{pid or os.getpid()}.{HOST}-{uuid.uuid4().hex[:8]}"


def remove_abandoned(folder: Path, pattern: str) -> None:
    """Remove what matches `pattern` in `folder` and is named `…-PID.HOST-RANDOM` for a process
    of this machine that no longer runs."""
    for path in folder.glob(pattern):
        parts = path.name.rsplit("-", 2)
        pid, _, host = parts[1].partition(".") if len(parts) == 3 else ("", "", "")
        if host == HOST and pid.isdigit() and not process_runs(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
