"""Several merges in one YAML file, as mergekit-multi runs them: one document per merge, each
with a `name` but the final one; a model named like a merge is that merge's output. Named merges
are written to `<intermediate folder>/<name>`, the final one to the output, each after the merges
it reads.

A merge whose output already holds it (the same config, over inputs whose content hashes its
manifest records) is reused, so a file run again after an edit redoes only the merges the edit
changes and those that read them. An intermediate output holding something else is replaced (the
folder is mergeflow's); the final output only with `overwrite`, as for one merge."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergeflow.config import MergeConfig, parse_config, read_documents
from mergeflow.engine import MergeResult, merge
from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.hashing import model_sha256_at
from mergeflow.merges import committed_manifest, input_hashes


@dataclass(frozen=True)
class PlannedMerge:
    name: str | None  # None: the final merge
    config: MergeConfig  # models named like merges replaced by their outputs
    out: str
    reads: tuple[str, ...]  # the merges whose outputs it reads

    @property
    def label(self) -> str:
        return f"merge '{self.name}'" if self.name else "the final merge"


def plan_merges(path: str | Path, out: str, intermediate_dir: str) -> list[PlannedMerge]:
    """The file's merges in an order in which each comes after those it reads."""
    configs: dict[str | None, MergeConfig] = {}
    wheres: dict[str | None, str] = {}
    for k, raw in enumerate(read_documents(path), 1):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: document {k}: expected a mapping with merge_method and models")
        raw = dict(raw)
        name = raw.pop("name", None)
        where = f"{path}: document {k}" + (f" ('{name}')" if name is not None else "")
        if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
            raise ConfigError(f"{where}: name: a merge's name is a folder name, got {name!r}")
        if name in configs:
            detail = f"another merge is named '{name}'" if name else "only the final merge goes unnamed"
            raise ConfigError(f"{where}: {detail}")
        configs[name], wheres[name] = parse_config(raw, source=where), where
    if None not in configs:
        raise ConfigError(
            f"{path}: every merge has a name; leave the final one unnamed (it goes to the output)"
        )
    outs = {name: out if name is None else _child(intermediate_dir, name) for name in configs}
    planned = {}
    for name, config in configs.items():
        patched, reads = _reading_outputs(config, outs, wheres[name])
        planned[name] = PlannedMerge(name, patched, outs[name], reads)
    return _in_order(planned, path)


def run_merges(
    plan: list[PlannedMerge],
    *,
    overwrite: bool = False,
    on_step: Callable[[PlannedMerge, MergeResult | None], None] | None = None,
    **options,
) -> list[MergeResult | None]:
    """Run `plan` (plan_merges); a merge whose output holds it already is reused (None in the
    result). `options` go to every merge (threads, progress, ...)."""
    redone: set[str | None] = set()
    results = []
    for step in plan:
        result = None
        try:
            if any(name in redone for name in step.reads) or not holds(step):
                result = merge(step.config, step.out, overwrite=overwrite or step.name is not None, **options)
                redone.add(step.name)
        except MergeflowError as error:  # which of the file's merges failed
            raise type(error)(f"{step.label}: {error}") from None
        results.append(result)
        if on_step is not None:
            on_step(step, result)
    return results


def holds(step: PlannedMerge) -> bool:
    """The step's output is a committed merge of its config over inputs of the same content."""
    manifest = committed_manifest(step.out)
    config = step.config
    if manifest is None or manifest.get("config") != config.model_dump(mode="json", exclude_defaults=True):
        return False
    base = model_sha256_at(config.base_model) if config.base_model else None
    return input_hashes(manifest) == (base, [model_sha256_at(entry.model) for entry in config.experts()])


def _child(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if "://" in folder else str(Path(folder) / name)


def _reading_outputs(
    config: MergeConfig, outs: dict[str | None, str], where: str
) -> tuple[MergeConfig, tuple[str, ...]]:
    """`config` with every model named like a merge replaced by that merge's output (its
    adapter, if any, kept), and the merges it reads."""
    reads: list[str] = []

    def output_of(ref: str) -> str:
        model, plus, adapter = ref.partition("+")
        merged = model.partition("@")[0]  # an output has no revision
        if merged not in outs:
            return ref
        reads.append(merged)
        return outs[merged] + plus + adapter

    data = config.model_dump(mode="json", exclude_defaults=True)
    for key in ("base_model", "tokenizer_source"):
        if data.get(key):
            data[key] = output_of(data[key])
    for entry in data.get("models", []) + [s for one in data.get("slices", []) for s in one["sources"]]:
        entry["model"] = output_of(entry["model"])
    for one in data.get("slices", []):
        if one.get("base_model"):
            one["base_model"] = output_of(one["base_model"])
    source = (data.get("tokenizer") or {}).get("source")
    if source and source not in ("base", "union"):
        data["tokenizer"]["source"] = output_of(source.removeprefix("model:"))
    return parse_config(data, source=where), tuple(dict.fromkeys(reads))


def _in_order(planned: dict[str | None, PlannedMerge], path) -> list[PlannedMerge]:
    """Each merge after those it reads, otherwise in the file's order, the final one last; a
    cycle is refused."""
    order: list[PlannedMerge] = []
    done: set[str | None] = set()
    visiting: list[str | None] = []

    def visit(name: str | None) -> None:
        step = planned[name]
        if name in done:
            return
        if name in visiting:
            cycle = " → ".join(f"'{n}'" for n in [*visiting[visiting.index(name) :], name])
            raise ConfigError(f"{path}: the merges read each other's outputs in a cycle: {cycle}")
        visiting.append(name)
        for read in step.reads:
            visit(read)
        visiting.pop()
        done.add(name)
        order.append(step)

    for name in [n for n in planned if n is not None] + [None]:  # the final merge last
        visit(name)
    return order
