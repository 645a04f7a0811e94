"""Writing a merged model: sharded safetensors into a staging folder, committed only when
complete. Locally the staging folder is renamed into place; in S3 every object is uploaded
first and the manifest last, so a prefix without a manifest is never a finished model; one
writer at a time holds the prefix (mergeflow.write_lock)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeflow.checkpoint import INDEX, MANIFEST
from mergeflow.errors import StorageError
from mergeflow.safetensors_io import PlannedTensor, ShardFileWriter
from mergeflow.scratch import new_scratch_folder, process_tagged, remove_abandoned, staging_folder
from mergeflow.sequential_file import cannot_write
from mergeflow.storage import Location, guarded, locate
from mergeflow.write_lock import LOCK_NAME, write_lock


@dataclass(frozen=True)
class WrittenFile:
    path: str
    sha256: str
    bytes: int


def write_small_file(folder: Path, name: str, data: bytes) -> WrittenFile:
    """A small file of an output (index, config, tokenizer, manifest) staged beside the shards."""
    path = folder / name
    try:
        path.write_bytes(data)
    except OSError as error:
        raise cannot_write(path, error) from error
    return WrittenFile(name, hashlib.sha256(data).hexdigest(), len(data))


# 2 GB in decimal units, as `mergeflow merge --shard-size 2GB` and Hugging Face's max_shard_size
# count them: one default for the CLI, the Python API and the pipeline's stored task vectors.
DEFAULT_SHARD_BYTES = 2_000_000_000


def shard_groups(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """The tensors, in order, in shards of at most `max_shard_bytes` (a larger tensor alone)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    return groups


class ShardedWriter:
    """Lays tensors out in order into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own) and writes them sequentially.

    With `background`, writing happens on a thread of its own and hashing on another, in order,
    while the caller computes the next piece (both release the GIL; a merge spent a quarter of
    its time writing). At most `QUEUED` pieces wait, so memory stays bounded; an error of a queued write
    is raised by a later `write` or by `finish`."""

    # A merge's pieces are chunks: 16 of them in the output dtype hold at most about the working
    # memory. 16 rather than 4 lets the merge run ahead while the writer is held up (dare_ties,
    # 2 experts: 0.955 against 0.97 s, medians of 8 side by side; peak RSS +5-10 MB).
    QUEUED = 16

    def __init__(
        self, folder: Path, tensors: list[PlannedTensor], max_shard_bytes: int, background: bool = False
    ) -> None:
        groups = shard_groups(tensors, max_shard_bytes)
        count = len(groups)
        self.names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._folder = folder
        self._groups = groups
        self._shard_of = {t.name: i for i, group in enumerate(groups) for t in group}
        self._current: tuple[int, ShardFileWriter] | None = None
        self.files: list[WrittenFile] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mergeflow-write") if background else None
        self._hasher = (
            ThreadPoolExecutor(1, thread_name_prefix="mergeflow-hash-output") if background else None
        )
        self._queued: deque[Future] = deque()

    def write(self, name: str, data: np.ndarray) -> None:
        """Append the next piece of tensor `name`. In the background, `data` is written after
        this returns: the caller must not change it afterwards."""
        if self._thread is None:
            self._write_now(name, data)
            return
        while len(self._queued) >= self.QUEUED:
            self._queued.popleft().result()
        self._queued.append(self._thread.submit(self._write_now, name, data))

    def _write_now(self, name: str, data: np.ndarray) -> None:
        index = self._shard_of[name]
        if self._current is None or self._current[0] != index:
            self._close_current()
            path = self._folder / self.names[index]
            self._current = (index, ShardFileWriter(str(path), self._groups[index], hasher=self._hasher))
        self._current[1].write(name, data)

    def finish(self) -> list[WrittenFile]:
        """Close the last shard; write the index when there are several shards."""
        while self._queued:
            self._queued.popleft().result()
        self._stop_thread()
        self._close_current()
        self._stop_hasher()
        if len(self.files) != len(self.names):
            raise RuntimeError("not every shard was written")
        if len(self.names) > 1:
            weight_map = {t.name: self.names[i] for i, g in enumerate(self._groups) for t in g}
            total = sum(t.nbytes for g in self._groups for t in g)
            index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            self.files.append(write_small_file(self._folder, INDEX, index.encode()))
        return self.files

    def abort(self) -> None:
        for queued in self._queued:
            queued.cancel()
        self._queued.clear()
        self._stop_thread()  # waits for a write in progress, so the file is closed after it
        if self._current is not None:
            self._current[1].abort()
        self._stop_hasher()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
            self._hasher = None

    def _close_current(self) -> None:
        if self._current is None:
            return
        index, writer = self._current
        sha = writer.finish()
        self.files.append(WrittenFile(self.names[index], sha, writer.bytes_written))
        self._current = None


def check_output_free(target: Location, overwrite: bool) -> None:
    """Nothing is at `target` yet, unless it may be replaced."""
    if not overwrite and any(existing_objects(target).values()):
        raise StorageError(f"{target.uri}: output already exists (pass --overwrite to replace it)")


def existing_objects(target: Location) -> dict[str, bool]:
    """What is already at `target`: for S3 every key but another writer's lock, mapped to
    whether it is content (folder entries and 'x/' markers are not, but a commit removes them
    too)."""
    if target.is_local:
        return {target.path: True} if target.has_files() else {}
    found = guarded(target, lambda: target.fs.find(target.path, detail=True))
    return {
        name: info["type"] == "file" and not name.endswith("/")
        for name, info in found.items()
        if posixpath.basename(name.rstrip("/")) != LOCK_NAME
    }


class StagedOutput:
    """A staging folder for one output, committed atomically (see module docstring)."""

    def __init__(self, out: str, overwrite: bool = False) -> None:
        self.target: Location = locate(out)
        self.overwrite = overwrite
        check_output_free(self.target, overwrite)
        if self.target.is_local:
            target = Path(self.target.path)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # Old outputs that killed merges into this one had moved aside.
                remove_abandoned(target.parent, f".{glob.escape(target.name)}.old-*")
                # Same parent folder, so the final rename is atomic on one filesystem.
                self.folder = staging_folder(target)
            except OSError as error:
                raise StorageError(f"{self.target.uri}: cannot write the output there: {error}") from error
        else:
            self.folder = new_scratch_folder("stage")

    def commit(self, manifest: dict) -> None:
        write_small_file(self.folder, MANIFEST, json.dumps(manifest, indent=2).encode())
        if not self.target.is_local:
            self._commit_s3()
            return
        try:
            self._commit_local()
        except OSError as error:
            raise StorageError(f"{self.target.uri}: cannot commit the output: {error}") from error

    def _commit_local(self) -> None:
        # Files and folder on the disk before the rename, and the rename after it: a power cut
        # leaves either the old output or the complete new one, never a renamed folder of
        # half-written files. (Shards were synced as they were closed; this is the small files.)
        for file in self.folder.iterdir():
            _sync(file)
        _sync(self.folder)
        target = Path(self.target.path)
        old = None
        if target.exists():
            old = target.parent / process_tagged(f".{target.name}.old")
            target.rename(old)
        self.folder.rename(target)
        _sync(target.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def _commit_s3(self) -> None:
        """Under the destination's write lock: remove what is there (the manifest first, so it
        stops looking complete), upload every file, the manifest last."""
        fs, prefix = self.target.fs, self.target.path
        try:
            with write_lock(self.target) as lock:
                existing = existing_objects(self.target)
                if any(existing.values()) and not self.overwrite:
                    raise StorageError(
                        f"{self.target.uri}: output already exists (another writer finished first; "
                        "pass --overwrite to replace it)"
                    )

                def upload() -> None:
                    manifest_key = f"{prefix}/{MANIFEST}"
                    for key in sorted(existing, key=lambda k: k != manifest_key):
                        lock.refresh()
                        fs.rm_file(key)
                    for file in sorted(self.folder.iterdir(), key=lambda f: f.name == MANIFEST):
                        lock.refresh()
                        fs.put_file(str(file), f"{prefix}/{file.name}")

                # S3 failures become one clear StorageError (transient ones marked so, for retries).
                guarded(self.target, upload, "upload failed")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _sync(path: Path) -> None:
    """Wait until a file's or a folder's contents are on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
