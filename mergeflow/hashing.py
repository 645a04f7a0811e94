"""Content hashes of input models, for lineage. Local file hashes are cached by
(path, size, mtime), so re-merging the same experts does not re-read them, and a weight file in
a Hugging Face cache is named by its sha256 already."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mergeflow.checkpoint import CONFIG, MANIFEST, Checkpoint, open_checkpoint
from mergeflow.storage import Location

HASH_BLOCK = 8 << 20
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_CACHE_LOCK = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("MERGEFLOW_CACHE_DIR", Path.home() / ".cache" / "mergeflow"))


def file_sha256(file: Location, remember: bool = True) -> str:
    """sha256 of one file. A local file's hash is remembered by (path, size, mtime) unless
    `remember` is off, for files in a throwaway folder that would only grow the cache."""
    if not file.is_local or not remember:
        digest = hashlib.sha256()
        with file.fs.open(file.path, "rb", block_size=HASH_BLOCK) as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
        return digest.hexdigest()
    stat = os.stat(file.path)
    key = f"{file.path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "file-hashes.json"
    known = read_json_cache(cache_file).get(key)
    if known:
        return known
    digest = hashlib.sha256()
    # One buffer read into again and again: a fresh bytes object per block would pay page
    # faults on every block (a fifth of the time of hashing a file from the page cache).
    block = memoryview(bytearray(HASH_BLOCK))
    with open(file.path, "rb", buffering=0) as f:
        while size := f.readinto(block):
            digest.update(block[:size])
    return update_json_cache(cache_file, {key: digest.hexdigest()})[key]


def hub_cache_sha256(file: Location) -> str | None:
    """The sha256 of a file in a Hugging Face hub cache, read from its name, or None.

    There a snapshot's large files link to `models--<org>--<name>/blobs/<sha256 of the content>`
    (the LFS object id huggingface_hub checked when it downloaded the file), so hashing
    gigabytes of an expert again would only repeat it. Small files are named by their git blob
    id (40 hex digits) and are hashed as usual."""
    if not file.is_local:
        return None
    target = Path(os.path.realpath(file.path))
    in_hub_cache = target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
    return target.name if in_hub_cache and _SHA256_NAME.fullmatch(target.name) else None


def model_sha256(checkpoint: Checkpoint) -> str:
    """sha256 over 'name sha256' lines of config.json and the weight files. A mergeflow
    manifest in the folder supplies the file hashes without reading the files."""
    return models_sha256([checkpoint])[0]


def models_sha256(checkpoints: list[Checkpoint], workers: int = 1) -> list[str]:
    """model_sha256 of each checkpoint, their files hashed on `workers` threads at once
    (hashlib releases the GIL while it hashes, so the files hash in parallel). Hashes a mergeflow
    manifest records or a Hugging Face cache names are taken as they are."""
    # Per checkpoint: (file name, its sha256 from the manifest, or the file to hash).
    wanted: list[list[tuple[str, str | Location]]] = []
    for checkpoint in checkpoints:
        recorded = {}
        if MANIFEST in checkpoint.file_names:
            manifest = checkpoint.read_json(MANIFEST)
            recorded = {f["path"]: f["sha256"] for f in manifest.get("files", [])}
        names = [CONFIG] if CONFIG in checkpoint.file_names else []
        names += [f.name for f in checkpoint.weight_files]
        files = {CONFIG: checkpoint.location.child(CONFIG)} | {f.name: f for f in checkpoint.weight_files}
        known = {name: recorded.get(name) or hub_cache_sha256(files[name]) for name in names}
        wanted.append([(name, known[name] or files[name]) for name in sorted(names)])
    to_hash = {item.uri: item for entries in wanted for _, item in entries if isinstance(item, Location)}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mergeflow-hash") as pool:
        hashes = dict(zip(to_hash, pool.map(file_sha256, to_hash.values()), strict=True))

    def line(name: str, item: str | Location) -> str:
        return f"{name} {hashes[item.uri] if isinstance(item, Location) else item}"

    return [hashlib.sha256("\n".join(line(*e) for e in entries).encode()).hexdigest() for entries in wanted]


def model_sha256_at(ref: str) -> str:
    """model_sha256 of the checkpoint at `ref` (path or URI); reads headers and the manifest."""
    checkpoint = open_checkpoint(ref)
    try:
        return model_sha256(checkpoint)
    finally:
        checkpoint.close()


def read_json_cache(path: Path) -> dict:
    """A JSON cache file's content; an absent or damaged file is an empty cache."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def update_json_cache(path: Path, entries: dict) -> dict:
    """Add `entries` to a JSON cache file and return its new content. Read-modify-write under a
    lock, as threads (Prefect's mapped tasks, the study's cells) update caches concurrently; the
    file is replaced whole, so readers never see half. Between processes an update may be lost,
    which only costs recomputing it later."""
    with _CACHE_LOCK:
        cache = read_json_cache(path) | entries
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        partial.write_text(json.dumps(cache, indent=1))
        os.replace(partial, path)
        return cache
