"""The zoo's model cache: each model under `MERGEFLOW_ZOO_DIR/models/<name>-<key>`, its key a
hash of everything that determines it, built in a staging folder and renamed into place with its
record (`mergeflow-zoo.json`) written last, so a folder with a record is complete."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from mergeflow.scratch import process_tagged, remove_abandoned
from mergeflow.zoo import RECORD, zoo_dir

# Bump when training or data code changes what a cached model would contain.
ZOO_CODE_VERSION = 2


def content_key(**parts) -> str:
    blob = json.dumps({"zoo_code_version": ZOO_CODE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def read_record(folder: Path) -> dict:
    return json.loads((folder / RECORD).read_text())


class NotBuilt(Exception):
    """A cache-only pass met a model that is not built yet."""


def cached(name: str, key: str, build: Callable[[Path], dict] | None) -> tuple[Path, dict, bool]:
    """The folder for (name, key), building it when absent (raising NotBuilt when `build` is
    None). Returns (folder, record, built)."""
    folder = zoo_dir() / "models" / f"{name}-{key[:12]}"
    if (folder / RECORD).is_file():
        return folder, read_record(folder), False
    if build is None:
        raise NotBuilt(folder.name)
    stage = folder.with_name(process_tagged(f".{folder.name}.partial"))
    stage.mkdir(parents=True)
    try:
        record = {"name": name, "key": key, **build(stage)}
        record["built_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        (stage / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        # A folder without a record is an aborted build: replace it.
        shutil.rmtree(folder, ignore_errors=True)
        stage.rename(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder, record, True


def remove_abandoned_stages() -> None:
    """Remove the staging folders of builds whose process (on this machine) is gone: killed, or a
    worker stopped when another failed. They never look complete, but they take disk."""
    remove_abandoned(zoo_dir() / "models", ".*.partial-*")
