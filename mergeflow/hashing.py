"""Content hashes of input models, for lineage. Local file hashes are cached by
(path, size, mtime) (mergeflow.file_hashes), so re-merging the same experts does not re-read
them, and a weight file in a Hugging Face cache is named by its sha256 already."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mergeflow.checkpoint import ADAPTER_PREFIX, CONFIG, MANIFEST, Checkpoint, open_checkpoint, read_json
from mergeflow.file_hashes import HASH_BLOCK, local_file_sha256
from mergeflow.storage import Location, locate

_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def file_sha256(file: Location, remember: bool = True) -> str:
    """sha256 of one file; a local file's hash is remembered unless `remember` is off
    (mergeflow.file_hashes.local_file_sha256)."""
    if file.is_local:
        return local_file_sha256(file.path, remember)
    digest = hashlib.sha256()
    with file.fs.open(file.path, "rb", block_size=HASH_BLOCK) as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


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
    """model_sha256 of each checkpoint, over its identity files (Checkpoint.identity_files),
    hashed on `workers` threads at once (hashlib releases the GIL while it hashes, so the files
    hash in parallel). Hashes a mergeflow manifest records or a Hugging Face cache names are
    taken as they are."""
    # Per checkpoint: (file name, its sha256 from the manifest, or the file to hash).
    wanted: list[list[tuple[str, str | Location]]] = []
    for checkpoint in checkpoints:
        recorded = _recorded(checkpoint.read_json(MANIFEST)) if MANIFEST in checkpoint.file_names else {}
        adapter = [f for name, f in checkpoint.identity_files.items() if name.startswith(ADAPTER_PREFIX)]
        # A published adapter's manifest, beside its files, has their hashes.
        manifest = locate(adapter[0].uri.rsplit("/", 1)[0]).child(MANIFEST) if adapter else None
        if manifest is not None and manifest.exists():
            beside = _recorded(read_json(manifest, f"model '{checkpoint.ref}': adapter"))
            recorded |= {ADAPTER_PREFIX + name: sha for name, sha in beside.items()}
        names = [CONFIG] if CONFIG in checkpoint.file_names else []
        names += list(checkpoint.identity_files)
        files = {CONFIG: checkpoint.location.child(CONFIG)} | checkpoint.identity_files
        known = {name: recorded.get(name) or hub_cache_sha256(files[name]) for name in names}
        wanted.append([(name, known[name] or files[name]) for name in sorted(names)])
    to_hash = {item.uri: item for entries in wanted for _, item in entries if isinstance(item, Location)}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mergeflow-hash") as pool:
        hashes = dict(zip(to_hash, pool.map(file_sha256, to_hash.values()), strict=True))

    def line(name: str, item: str | Location) -> str:
        return f"{name} {hashes[item.uri] if isinstance(item, Location) else item}"

    return [hashlib.sha256("\n".join(line(*e) for e in entries).encode()).hexdigest() for entries in wanted]


def _recorded(manifest: dict) -> dict[str, str]:
    """The sha256 by file name that a mergeflow manifest records."""
    return {f["path"]: f["sha256"] for f in manifest.get("files", [])}


def model_sha256_at(ref: str) -> str:
    """model_sha256 of the checkpoint at `ref` (path or URI, or model+adapter, whose adapter
    is not applied for it); reads headers and the manifest."""
    checkpoint = open_checkpoint(ref)
    try:
        return model_sha256(checkpoint)
    finally:
        checkpoint.close()
