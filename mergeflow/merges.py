"""Merges by content: a merge is identified by its method, parameters and the content hash of
every input, lives at a destination derived from that identity, and is reused when its
destination already holds it (per its manifest)."""

from __future__ import annotations

import hashlib
import json

from mergeflow.checkpoint import MANIFEST
from mergeflow.config import MergeConfig
from mergeflow.engine import merge
from mergeflow.storage import locate
from mergeflow.task_vectors import is_complete

# The paper's four methods as mergeflow runs them by default: method → (fixed parameters, grid
# searched on held-in validation), the paper's λ search shrunk to two or three values.
PAPER_METHODS: dict[str, tuple[dict[str, float], dict[str, list[float]]]] = {
    "average": ({}, {}),
    "task_arithmetic": ({}, {"lambda": [0.3, 0.6, 1.0]}),
    "ties": ({"density": 0.2}, {"lambda": [0.6, 1.0]}),
    "dare_ties": ({"density": 0.2, "seed": 0}, {"lambda": [0.6, 1.0]}),
}


def merge_key(method: str, parameters: dict, base_sha256: str, model_sha256s: list[str]) -> str:
    identity = {"method": method, "parameters": parameters, "base": base_sha256, "models": model_sha256s}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def default_destination(store: str, base_family: str, method: str, key: str) -> str:
    return f"{store.rstrip('/')}/merged/{base_family}/{method}-{key[:12]}"


def committed_manifest(destination: str) -> dict | None:
    """The manifest of the merge committed at `destination`, or None where there is none."""
    if not is_complete(destination):
        return None
    return json.loads(locate(destination).child(MANIFEST).read_bytes())


def input_hashes(manifest: dict) -> tuple[str | None, list[str | None]]:
    """The content hashes a merge's manifest records: its base's (None without one), its models'."""
    inputs = manifest.get("inputs") or {}
    return (inputs.get("base") or {}).get("sha256"), [m.get("sha256") for m in inputs.get("models", [])]


def holds_merge(
    destination: str, method: str, parameters: dict, base_sha256: str, model_sha256s: list[str]
) -> bool:
    """`destination` holds a committed merge with exactly this method, parameters and inputs."""
    manifest = committed_manifest(destination)
    return (
        manifest is not None
        and manifest.get("method") == method
        and (manifest.get("config") or {}).get("parameters", {}) == parameters
        and input_hashes(manifest) == (base_sha256, model_sha256s)
    )


def merge_or_reuse(
    method: str, parameters: dict, base: tuple[str, str], models: list[tuple[str, str]], destination: str
) -> bool:
    """Merge `models` ((path, sha256) each, e.g. task vectors) onto `base` (path, sha256) into
    `destination` unless it holds this merge already. Returns True when it merged."""
    shas = [sha for _, sha in models]
    if holds_merge(destination, method, parameters, base[1], shas):
        return False
    config = MergeConfig(
        merge_method=method,
        base_model=base[0],
        models=[{"model": path} for path, _ in models],
        parameters=parameters,
    )
    merge(config, destination, overwrite=True)
    return True
