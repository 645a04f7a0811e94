"""Experts in the artifact store, laid out so a merge policy can find the latest per task:

    <artifacts>/bases/<base>/                       the base model of family <base>
    <artifacts>/experts/<base>/<task>/<sha12>/      one expert version, committed by its manifest

`publish_expert` puts an expert there (and its base, when given) and announces it with the
event `mergeflow.expert.landed`. An expert given as a PEFT LoRA adapter of the base is stored as
the adapter (megabytes, not the model's gigabytes): its version's `ref`, which merges and
evaluations read, is mergekit's `<base>+<adapter>`, and its hash the adapted model's. Tools
that upload experts themselves follow the same layout with a `mergeflow-manifest.json`; the
watcher flow announces those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergeflow.checkpoint import ADAPTER_CONFIG, MANIFEST
from mergeflow.errors import CheckpointError
from mergeflow.hashing import model_sha256_at
from mergeflow.publish import publish_folder
from mergeflow.storage import check_name, locate

ANNOUNCED = "experts/.announced.json"


@dataclass(frozen=True)
class ExpertVersion:
    base: str
    task: str
    uri: str  # where the version is stored
    ref: str  # the model a merge reads: `uri`, or for a LoRA adapter `<base uri>+<uri>`
    sha256: str  # model content hash (of the adapted model, for an adapter)
    created_at: str

    def payload(self, base_model: str) -> dict:
        return {"base": self.base, "task": self.task, "sha256": self.sha256, "base_model": base_model}


def base_uri(store: str, base: str) -> str:
    return f"{store.rstrip('/')}/bases/{base}"


def publish_expert(
    folder: Path, base: str, task: str, store: str, base_model: Path | None = None
) -> ExpertVersion:
    """Upload `folder` as an expert of `base` for `task` (and `base_model` as the base).
    `folder` is a model, or a LoRA adapter of the base, checked against it here and stored as
    it is (merges apply it as mergekit's model+adapter)."""
    check_name("base", base)
    check_name("task", task)
    if base_model is not None:
        publish_folder(Path(base_model), base_uri(store, base))
    elif not locate(base_uri(store, base)).child(MANIFEST).exists():
        raise CheckpointError(
            f"base {base!r} is not in {store} yet ({base_uri(store, base)}); pass --base-model PATH once"
        )
    adapter = (Path(folder) / ADAPTER_CONFIG).is_file()
    sha = model_sha256_at(f"{base_uri(store, base)}+{folder}" if adapter else str(folder))
    uri = f"{store.rstrip('/')}/experts/{base}/{task}/{sha[:12]}"
    publish_folder(Path(folder), uri)
    return _version(store, base, task, uri)


def list_experts(store: str, base: str | None = None) -> list[ExpertVersion]:
    """Every complete expert version under `store` (of one base, or of all), oldest first."""
    root = locate(f"{store.rstrip('/')}/experts")
    if not root.is_dir():
        return []
    found = []
    for base_name in [base] if base else _folders(root):
        base_location = root.child(base_name)
        for task in _folders(base_location) if base_location.is_dir() else []:
            for version in _folders(base_location.child(task)):
                location = base_location.child(task).child(version)
                if location.child(MANIFEST).exists():
                    found.append(_version(store, base_name, task, location.uri))
    return sorted(found, key=lambda v: (v.created_at, v.uri))


def latest_per_task(experts: list[ExpertVersion]) -> dict[str, ExpertVersion]:
    latest: dict[str, ExpertVersion] = {}
    for expert in experts:  # oldest first, so later ones win
        latest[expert.task] = expert
    return dict(sorted(latest.items()))


def read_announced(store: str) -> set[str]:
    location = locate(f"{store.rstrip('/')}/{ANNOUNCED}")
    return set(json.loads(location.read_bytes())) if location.exists() else set()


def write_announced(store: str, announced: set[str]) -> None:
    locate(f"{store.rstrip('/')}/{ANNOUNCED}").write_bytes(json.dumps(sorted(announced), indent=1).encode())


def _version(store: str, base: str, task: str, uri: str) -> ExpertVersion:
    location = locate(uri)
    manifest = json.loads(location.child(MANIFEST).read_bytes())
    adapter = any(f.get("path") == ADAPTER_CONFIG for f in manifest.get("files", []))
    ref = f"{base_uri(store, base)}+{location.uri}" if adapter else location.uri
    return ExpertVersion(base, task, location.uri, ref, model_sha256_at(ref), manifest.get("created_at", ""))


def _folders(location) -> list[str]:
    if location.is_local:
        path = Path(location.path)
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries = location.fs.ls(location.path, detail=True, refresh=True)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
