"""Folders for one process's intermediate files, named with its process id, so that those a
killed process leaves are removed when the next process makes one: a merge's scratch folder
under the cache folder (adapted tensors, converted pickles, an S3 output's staged files) and a
local output's staging folder beside the output. A killed merge never leaves anything that
looks complete; this keeps it from leaving disk used either."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from mergeflow.file_hashes import cache_dir
from mergeflow.write_lock import process_runs


def new_scratch_folder(kind: str) -> Path:
    """A new, empty folder of this process under the cache folder (on disk: /tmp may be memory,
    and what goes here can be as large as a model). The caller removes it."""
    root = cache_dir() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root, "*")
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))


def process_tagged(prefix: str) -> str:
    """A name `prefix-PID-RANDOM` for a file or folder of this process."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_abandoned(folder: Path, pattern: str) -> None:
    """Remove what matches `pattern` in `folder` and is named `…-PID-RANDOM` for a process
    that no longer runs on this machine."""
    for path in folder.glob(pattern):
        parts = path.name.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and not process_runs(int(parts[1])):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
