"""Resolve a model reference (local path, file://, s3://, MLflow models:/<name>/<version or
alias> URI, or mergekit's MODEL+ADAPTER) to a verified local folder.

A folder with a `mergeflow-manifest.json` is checked file by file against the sha256 and size it
lists; any checkpoint must open (config, weights, index). S3 models are downloaded into
`MERGEFLOW_CACHE_DIR/models/<hash of the manifest or the file listing>` through a staging folder
renamed when complete, so a second fetch of the same model reads nothing but the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mergeflow.checkpoint import MANIFEST, resolve
from mergeflow.errors import CheckpointError
from mergeflow.file_hashes import cache_dir
from mergeflow.hashing import file_sha256, model_sha256_at
from mergeflow.scratch import process_tagged, remove_abandoned
from mergeflow.storage import locate

MLFLOW_SCHEME = "models:/"


@dataclass(frozen=True)
class FetchedModel:
    ref: str
    path: Path
    sha256: str  # content hash of config + weights (mergeflow.hashing.model_sha256)


def verify_manifest(
    folder: Path, ref: str | None = None, required: bool = False, hashes: bool = True, remember: bool = True
) -> None:
    """Every file a mergeflow manifest lists exists with its size and (with `hashes`) sha256.
    Without a manifest there is nothing to check, unless it is `required`. `remember`: keep
    the hashes in the file-hash cache (not for a throwaway download folder)."""
    manifest_path = folder / MANIFEST
    name = ref or str(folder)
    if not manifest_path.is_file():
        if required:
            raise CheckpointError(f"{name}: {MANIFEST} is missing, so the model files cannot be verified")
        return
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{name}: {MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise CheckpointError(f"{name}: {MANIFEST} has no list of files")
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            raise CheckpointError(f"{name}: {entry['path']} is listed in {MANIFEST} but missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{name}: {entry['path']} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            )
        if not hashes:
            continue
        actual = file_sha256(locate(str(path)), remember)
        if actual != entry["sha256"]:
            raise CheckpointError(
                f"{name}: {entry['path']} sha256 {actual[:12]}… does not match "
                f"the manifest's {entry['sha256'][:12]}…"
            )


def fetch_model(ref: str) -> FetchedModel:
    if ref.startswith(MLFLOW_SCHEME):
        folder = _download_registered(ref)
    elif "+" in ref and not locate(ref).exists():
        folder = _adapted(ref)
    else:
        location = locate(ref)
        folder = Path(location.path) if location.is_local else _download(ref)
    verify_manifest(folder, ref)
    sha = model_sha256_at(str(folder))
    return FetchedModel(ref, folder, sha)


def _adapted(ref: str) -> Path:
    """mergekit's model+adapter as a whole model folder, since the pipeline evaluates models
    from folders: a linear merge of that one model, which writes the adapted weights unchanged
    with the model's config and tokenizer. Cached by the hashes of the model, the adapter's
    files and mergeflow's version, so a cached fetch applies nothing."""
    import mergeflow
    from mergeflow.config import MergeConfig
    from mergeflow.engine import merge
    from mergeflow.lora import adapter_files, split_adapter_reference

    model_ref, adapter_ref = split_adapter_reference(ref)
    adapter = adapter_files(f"model '{ref}': adapter '{adapter_ref}'", resolve(adapter_ref)[0])
    identity = [model_sha256_at(model_ref), *(file_sha256(f) for f in adapter), mergeflow.__version__]
    folder = (
        cache_dir() / "models" / f"adapted-{hashlib.sha256(chr(0).join(identity).encode()).hexdigest()[:24]}"
    )
    if not folder.is_dir():
        # overwrite: a concurrent fetch of the same model commits the same files
        merge(MergeConfig(merge_method="linear", models=[{"model": ref}]), str(folder), overwrite=True)
    return folder


def _download_registered(ref: str) -> Path:
    """models:/<name>/<version or alias> from the MLflow registry of mergeflow's settings, cached
    by the version's run (an alias is resolved anew on every fetch); every file is checked
    against the version's manifest on download."""
    from mergeflow.registry import load_registered, resolve_version

    name, _, which = ref.removeprefix(MLFLOW_SCHEME).partition("/")
    if not name or not which:
        raise CheckpointError(f"{ref}: an MLflow model reference is models:/<name>/<version or alias>")
    version = resolve_version(name, which)
    folder = (
        cache_dir()
        / "models"
        / hashlib.sha256(f"{name}\0{version.run_id}\0{version.version}".encode()).hexdigest()[:24]
    )
    if not folder.is_dir():
        load_registered(name, str(version.version), dest=folder)
    return folder


def _download(ref: str) -> Path:
    location = locate(ref)
    if not location.has_files():
        raise CheckpointError(f"{ref}: no such model (nothing stored under this prefix)")
    names = sorted(location.list_names())
    if MANIFEST in names:
        identity = location.child(MANIFEST).read_bytes()
    else:
        # Without a manifest, the listing (names and sizes) identifies the version.
        identity = json.dumps([(n, location.child(n).size()) for n in names]).encode()
    folder = cache_dir() / "models" / hashlib.sha256(ref.encode() + b"\0" + identity).hexdigest()[:24]
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(folder.parent, ".*.partial-*")  # downloads of killed processes
    stage = folder.parent / process_tagged(f".{folder.name}.partial")
    stage.mkdir()
    try:
        for name in names:
            # fs.get streams to disk; shards never sit whole in memory.
            location.fs.get(location.child(name).path, str(stage / name))
        verify_manifest(stage, ref)
        stage.rename(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder
