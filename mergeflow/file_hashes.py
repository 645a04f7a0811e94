"""sha256 of local files, remembered across processes by (path, size, mtime) and computed at
most once at a time within a process. Imports nothing heavy: `mergeflow merge` starts hashing
its inputs on the core that importing numba and the engine leaves idle (mergeflow.hashing
hashes models)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

import yaml

from mergeflow.errors import StorageError

HASH_BLOCK = 8 << 20  # bytes per S3 range request while hashing
# A local file is read into a 2 MB buffer, a piece at a time, and hashed from there. Hashing bytes
# that the copy has just brought into the core's cache ran at ~1.9 GB/s on a 2-core Xeon, hashing
# them where they lie in the page cache (through read-only mappings) at ~1.15: with the copy,
# 1.28 against 1.0 GB per CPU-second. Side by side, with a cold hash cache: linear with 8
# experts 2.38 against 2.58 s, dare_ties with 8 3.23 against 3.44 s, 2 experts the same.
# Larger pieces fall out of the cache (16 MB: linear with 8 took 2.97 s).
LOCAL_PIECE = 2 << 20
_CACHE_LOCK = threading.Lock()
_IN_FLIGHT: dict[str, Future] = {}  # cache key -> the hash another thread is computing


def cache_dir() -> Path:
    return Path(os.environ.get("MERGEFLOW_CACHE_DIR", Path.home() / ".cache" / "mergeflow"))


def local_file_sha256(path: str, remember: bool = True) -> str:
    """sha256 of a local file. Remembered by (path, size, mtime) unless `remember` is off, for
    files in a throwaway folder that would only grow the cache; a file another thread is
    hashing is waited for, not hashed twice."""
    if not remember:
        return _sha256_of(path)
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise _cannot_hash(path, exc) from exc
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "file-hashes.json"
    known = read_json_cache(cache_file).get(key)
    if known:
        return known
    with _CACHE_LOCK:
        running = _IN_FLIGHT.get(key)
        if running is None:
            _IN_FLIGHT[key] = mine = Future()
    if running is not None:
        return running.result()
    try:
        digest = _sha256_of(path)
        update_json_cache(cache_file, {key: digest})
        mine.set_result(digest)
        return digest
    except BaseException as exc:
        mine.set_exception(exc)
        raise
    finally:
        with _CACHE_LOCK:
            del _IN_FLIGHT[key]


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    piece = bytearray(LOCAL_PIECE)
    view = memoryview(piece)
    try:
        with open(path, "rb", buffering=0) as f:
            while read := f.readinto(piece):
                digest.update(view[:read])
    except OSError as exc:  # unreadable or gone
        raise _cannot_hash(path, exc) from exc
    return digest.hexdigest()


def _cannot_hash(path: str, error: OSError | ValueError) -> StorageError:
    return StorageError(f"{path}: cannot hash it: {getattr(error, 'strerror', None) or error}")


def start_hashing_inputs(config_path: str | Path) -> None:
    """Hash the local weight files of the models in a merge config on a background thread.

    Starting the merge (importing numba and the engine, ~0.4 s on one core) leaves a core idle;
    hashing the inputs for the lineage record meanwhile (hashlib releases the GIL) takes part of
    that work off the merge, which then finds each hash done or waits for the one in progress.
    Measured when merges imported torch (~1 s): TIES with 2 experts and a cold hash cache, 2.80
    against 2.99 s (medians of 5). A config this cannot read is left to the merge to report; the daemon
    thread ends with the process.
    """
    files = local_model_files(config_path)
    if files:
        threading.Thread(target=_hash_quietly, args=(files,), name="mergeflow-prehash", daemon=True).start()


def _hash_quietly(files: list[str]) -> None:
    for file in files:
        with contextlib.suppress(StorageError):  # the merge reports it
            local_file_sha256(file)


def local_model_files(config_path: str | Path) -> list[str]:
    """config.json and weight files of each local model folder named in a mergekit YAML (each
    of its documents, for a file of several merges)."""
    try:
        documents = list(yaml.safe_load_all(Path(config_path).read_text()))
    except (OSError, yaml.YAMLError):
        return []
    refs = []
    for raw in (d for d in documents if isinstance(d, dict)):
        entries = _list(raw.get("models"))
        for layer_slice in (s for s in _list(raw.get("slices")) if isinstance(s, dict)):
            entries += _list(layer_slice.get("sources")) + [{"model": layer_slice.get("base_model")}]
        refs += [raw.get("base_model")] + [m.get("model") for m in entries if isinstance(m, dict)]
    files: list[str] = []
    for ref in dict.fromkeys(r.removeprefix("file://") for r in refs if isinstance(r, str)):
        if "://" in ref:
            continue
        folder = Path(ref).expanduser().resolve()  # as mergeflow.storage.locate: the same cache keys
        wanted = [folder / "config.json", *_weight_files(folder)]
        if not folder.is_dir() and "+" in ref:  # mergekit's model+adapter: the model's and the adapter's
            model_ref, _, adapter_ref = ref.partition("+")
            model, adapter = (Path(r).expanduser().resolve() for r in (model_ref, adapter_ref))
            wanted = [model / "config.json", *_weight_files(model), *(adapter / n for n in _ADAPTER_FILES)]
        files += [str(f) for f in wanted if f.is_file()]
    return files


# A PEFT adapter's files: mergeflow.checkpoint's ADAPTER_* names, written here because
# checkpoint imports this module (through mergeflow.scratch).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    with contextlib.suppress(OSError, ValueError, KeyError, AttributeError, TypeError):
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


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
