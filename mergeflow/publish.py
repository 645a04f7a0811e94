"""Publishing model folders (a built zoo) to a store, each committed by a manifest.

`publish_folder` uploads every file of a folder, then a `mergeflow-manifest.json` listing each
file's sha256 and size; the manifest goes last, so a destination without one is never a
finished model, and `mergeflow.fetch.fetch_model` verifies every file against it. Publishing
the same folder again finds the same manifest and uploads nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import mergeflow
from mergeflow.checkpoint import MANIFEST
from mergeflow.errors import CheckpointError
from mergeflow.hashing import file_sha256
from mergeflow.output import StagedOutput
from mergeflow.storage import locate


def folder_files(folder: Path) -> list[dict]:
    """{path, sha256, bytes} of every file in `folder` but a manifest, sorted by name."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    return [
        {"path": file.name, "sha256": file_sha256(locate(str(file))), "bytes": file.stat().st_size}
        for file in sorted(folder.iterdir())
        if file.is_file() and file.name != MANIFEST
    ]


def publish_folder(folder: Path, dest: str) -> bool:
    """Upload `folder` to `dest` (path or s3:// URI) with a manifest. Returns False when `dest`
    already held exactly these files, True when they were uploaded."""
    files = folder_files(folder)
    target = locate(dest)
    if target.child(MANIFEST).exists():
        existing = json.loads(target.child(MANIFEST).read_bytes())
        if existing.get("files") == files:
            return False
    stage = StagedOutput(dest, overwrite=True)
    try:
        for entry in files:
            _link_or_copy(folder / entry["path"], stage.folder / entry["path"])
        stage.commit(
            {
                "format": "mergeflow-manifest/1",
                "kind": "published",
                "mergeflow_version": mergeflow.__version__,
                # Microseconds: "the latest expert of a task" is decided by this, and a burst of
                # uploads lands several within one second.
                "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                "source": str(folder),
                "files": files,
            }
        )
    except BaseException:
        stage.discard()
        raise
    return True


def zoo_destinations(index: dict, root: str) -> dict[str, str]:
    """Local folder → its URI under `root`/zoo/<preset>/ for every model of a preset index."""
    prefix = f"{root.rstrip('/')}/zoo/{index['preset']}"
    folders = []
    for family in index["families"].values():
        folders += [family["base"], family["multitask"], *family["experts"].values()]
    return {folder: f"{prefix}/{Path(folder).name}" for folder in dict.fromkeys(folders)}


def published_index(index: dict, destinations: dict[str, str]) -> dict:
    """The preset index with every model path replaced by its published URI."""
    families = {
        name: family
        | {
            "base": destinations[family["base"]],
            "multitask": destinations[family["multitask"]],
            "experts": {task: destinations[path] for task, path in family["experts"].items()},
        }
        for name, family in index["families"].items()
    }
    return {key: value for key, value in index.items() if key != "built_now"} | {"families": families}


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs no space in a local staging folder; across filesystems, copy.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
