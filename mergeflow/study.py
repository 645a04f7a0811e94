"""The paper's grid on a zoo: base family (PT/IT × size) × number of experts × method × seed.

A cell merges `n_experts` experts of one family, chosen by `seed` (the paper's seeds pick
which experts are merged), with one method; its hyper-parameters are picked on held-in
validation as the paper does, and the chosen merge is scored on the test split. Every piece is
content-addressed: task vectors and merges live under the artifact store keyed by input hashes,
and scores are cached by model hash, task and split (`cached_scores`), so a re-run after an
interruption, or a grid with one more axis value, only computes what is missing.

Results are one tidy table (COLUMNS): one row per (cell, model, task), with reference rows for
the base, each expert and each family's multitask model (`method` = "reference").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass

import pandas as pd
from pydantic import BaseModel, Field, field_validator

from mergeflow.errors import ConfigError
from mergeflow.eval.harness import evaluate
from mergeflow.eval.metrics import normalise, task_infos
from mergeflow.eval.tasks import held_out_tasks
from mergeflow.file_hashes import cache_dir, read_json_cache, update_json_cache
from mergeflow.hashing import model_sha256_at
from mergeflow.merges import PAPER_METHODS, default_destination, merge_key, merge_or_reuse
from mergeflow.methods import METHODS
from mergeflow.task_vectors import ensure_task_vector

# Values a study tries, chosen on held-in validation like the paper's λ, for a method's
# parameter that has no default: slerp's interpolation factor t, and nearswap's distance t, at
# the scale of fine-tuning task vectors.
REQUIRED_PARAMETER_VALUES: dict[str, dict[str, list[float]]] = {
    "slerp": {"t": [0.3, 0.5, 0.7]},
    "nearswap": {"t": [1e-4, 1e-3, 1e-2]},
}

COLUMNS = [
    "family",
    "stage",
    "size",
    "method",
    "n_experts",
    "seed",
    "parameters",
    "model",
    "task",
    "category",
    "kind",
    "raw",
    "normalised",
]


class StudyGrid(BaseModel):
    """Which cells a study runs. Families default to every family of the zoo index."""

    families: list[str] | None = Field(None, description="Base families (zoo index names); default all")
    expert_counts: list[int] = Field(
        [1, 2, 4, 8], description="Numbers of experts merged (capped by the zoo)"
    )
    methods: list[str] = Field(default_factory=lambda: list(PAPER_METHODS), description="Merge methods")
    seeds: list[int] = Field([0, 1, 2], description="Seeds choosing which experts are merged")
    held_out: list[str] | None = Field(None, description="Held-out tasks; default all")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)}")
        for method in methods:
            tried = REQUIRED_PARAMETER_VALUES.get(method, {})
            untried = [p for p in _required_parameters(method) if p not in tried]
            if method not in PAPER_METHODS and untried:
                raise ValueError(f"method {method!r}: no study values for {', '.join(untried)}")
        return methods

    @field_validator("expert_counts")
    @classmethod
    def _positive(cls, counts: list[int]) -> list[int]:
        if not counts or min(counts) < 1:
            raise ValueError("expert counts must be ≥ 1")
        return sorted(set(counts))


@dataclass(frozen=True)
class Cell:
    family: str
    stage: str
    size: str
    method: str
    n_experts: int
    seed: int
    base: str
    experts: tuple[tuple[str, str], ...]  # (task, model path), sorted by task

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.family}/{self.method}/n{self.n_experts}/s{self.seed}"


def choose_experts(tasks: list[str], n: int, seed: int, family: str) -> list[str]:
    """`n` of `tasks`, chosen by `seed`: the same (family, n, seed) always gives the same set,
    whatever the method, so methods are compared on the same experts."""
    rng = random.Random(f"{family}/{n}/{seed}")  # str seeds hash deterministically (sha512)
    return sorted(rng.sample(sorted(tasks), min(n, len(tasks))))


def enumerate_cells(index: dict, grid: StudyGrid) -> list[Cell]:
    """Every cell of `grid` over the families of a zoo preset index. Expert counts above a
    family's number of experts are capped, a (family, n, seed) whose chosen set repeats an
    earlier seed's (e.g. n = all experts) is kept once, and a method is left out of the counts
    it cannot merge (model_stock needs 2 experts or more, slerp exactly 1)."""
    families = grid.families or sorted(index["families"])
    missing = [name for name in families if name not in index["families"]]
    if missing:
        raise ConfigError(f"families not in zoo preset {index['preset']!r}: {', '.join(missing)}")
    cells = []
    for name in families:
        family = index["families"][name]
        tasks = sorted(family["experts"])
        for n in sorted({min(n, len(tasks)) for n in grid.expert_counts}):
            chosen_sets: list[list[str]] = []
            for seed in grid.seeds:
                chosen = choose_experts(tasks, n, seed, name)
                if chosen in chosen_sets:
                    continue
                chosen_sets.append(chosen)
                experts = tuple((task, family["experts"][task]) for task in chosen)
                for method in filter(lambda m: METHODS[m].merges(n), grid.methods):
                    cells.append(
                        Cell(name, family["stage"], family["size"], method, n, seed, family["base"], experts)
                    )
    return cells


def largest_first(cells: list[Cell]) -> list[Cell]:
    """Cells in the order to hand to parallel workers: the costliest first, so that the last
    cells to finish are short ones and no worker idles while another runs a long cell. A cell
    costs about one merge and one scoring of its held-in tasks per hyper-parameter candidate."""

    def cost(cell: Cell) -> int:
        return cell.n_experts * len(candidates(cell.method))

    return sorted(cells, key=cost, reverse=True)  # stable: equal costs keep the grid's order


# --- running a cell -------------------------------------------------------------------------


def run_cell(cell: Cell, store: str, held_out: list[str] | None = None) -> pd.DataFrame:
    """Merge and score one cell; rows in COLUMNS order (the merged model only)."""
    base_sha = model_sha256_at(cell.base)
    vectors = [ensure_task_vector(cell.base, path, store) for _, path in cell.experts]
    models = [(v.uri, model_sha256_at(v.uri)) for v in vectors]
    tasks = [task for task, _ in cell.experts]
    expert_paths = dict(cell.experts)

    def merged(parameters: dict) -> str:
        key = merge_key(cell.method, parameters, base_sha, [sha for _, sha in models])
        destination = default_destination(store, f"study-{cell.family}", cell.method, key)
        merge_or_reuse(cell.method, parameters, (cell.base, base_sha), models, destination)
        return destination

    def held_in_mean(path: str, split: str) -> float:
        mine = cached_scores(path, tasks, split)
        return sum(mine[t] / max(cached_scores(expert_paths[t], [t], split)[t], 1e-9) for t in tasks) / len(
            tasks
        )

    tried = candidates(cell.method)
    best = max(tried, key=lambda p: held_in_mean(merged(p), "validation")) if len(tried) > 1 else tried[0]
    path = merged(best)
    held_out_names = held_out or held_out_tasks()
    raw = {("merged", t): v for t, v in cached_scores(path, tasks + held_out_names, "test").items()}
    raw |= {(f"expert:{t}", t): cached_scores(expert_paths[t], [t], "test")[t] for t in tasks}
    raw |= {("base", t): v for t, v in cached_scores(cell.base, held_out_names, "test").items()}
    table = normalise(raw, task_infos({t for _, t in raw}), "base", {t: f"expert:{t}" for t in tasks})
    table = table[table.model == "merged"]
    return _with_cell_columns(table, cell, json.dumps(best, sort_keys=True))


def shared_scorings(
    index: dict, family_name: str, held_out: list[str] | None = None
) -> list[tuple[str, list[str], list[str]]]:
    """The scorings a family's cells share, as (model, tasks, splits): the base and the
    multitask model on every task's test split, each expert on its own task's validation split
    (hyper-parameters are picked against it) and test split. They are independent of each
    other, so parallel workers can share them out; the costliest come first."""
    family = index["families"][family_name]
    everything = sorted(family["experts"]) + (held_out or held_out_tasks())
    scorings = [(family["base"], everything, ["test"]), (family["multitask"], everything, ["test"])]
    scorings += [(path, [task], ["validation", "test"]) for task, path in sorted(family["experts"].items())]
    return scorings


def score(path: str, tasks: list[str], splits: list[str]) -> None:
    """Fill the score cache for one model (see `cached_scores`)."""
    for split in splits:
        cached_scores(path, tasks, split)


def prepare_family(
    index: dict, family_name: str, store: str, held_out: list[str] | None = None
) -> pd.DataFrame:
    """Everything a family's cells share, done once before they run in parallel: its task
    vectors and its `shared_scorings` (quick when those ran already). Returns the family's
    reference rows."""
    family = index["families"][family_name]
    for path, tasks, splits in shared_scorings(index, family_name, held_out):
        score(path, tasks, splits)
    for path in family["experts"].values():
        ensure_task_vector(family["base"], path, store)
    return reference_rows(index, family_name, held_out)


def reference_rows(index: dict, family_name: str, held_out: list[str] | None = None) -> pd.DataFrame:
    """The base, every expert on its own task and the multitask model, normalised like merges."""
    family = index["families"][family_name]
    tasks = sorted(family["experts"])
    held_out_names = held_out or held_out_tasks()
    raw = {("base", t): v for t, v in cached_scores(family["base"], tasks + held_out_names, "test").items()}
    raw |= {(f"expert:{t}", t): cached_scores(family["experts"][t], [t], "test")[t] for t in tasks}
    raw |= {
        ("multitask", t): v
        for t, v in cached_scores(family["multitask"], tasks + held_out_names, "test").items()
    }
    table = normalise(raw, task_infos({t for _, t in raw}), "base", {t: f"expert:{t}" for t in tasks})
    cell = Cell(family_name, family["stage"], family["size"], "reference", len(tasks), -1, family["base"], ())
    return _with_cell_columns(table, cell, "{}")


def _with_cell_columns(table: pd.DataFrame, cell: Cell, parameters: str) -> pd.DataFrame:
    table = table.copy()
    for column in ("family", "stage", "size", "method", "n_experts", "seed"):
        table[column] = getattr(cell, column)
    table["parameters"] = parameters
    return table[COLUMNS].reset_index(drop=True)


def candidates(method: str) -> list[dict]:
    """The hyper-parameter settings tried for a method, the paper's for its methods (fixed
    values plus a λ grid); other methods run at their defaults, trying REQUIRED_PARAMETER_VALUES
    for a parameter that has none (slerp's and nearswap's t)."""
    if method in PAPER_METHODS:
        fixed, grid = PAPER_METHODS[method]
    else:
        values = REQUIRED_PARAMETER_VALUES.get(method, {})
        fixed, grid = {}, {name: values[name] for name in _required_parameters(method)}
    return [fixed | dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _required_parameters(method: str) -> list[str]:
    return [param.name for param in METHODS[method].params if param.default is None]


# --- scores cached by content -----------------------------------------------------------------


def cached_scores(path: str, tasks: list[str], split: str) -> dict[str, float]:
    """Accuracy of the model at `path` (local or s3://) on each task, cached by the model's
    content hash under MERGEFLOW_CACHE_DIR/scores/, so any model is scored once per task."""
    from mergeflow.fetch import fetch_model

    sha = model_sha256_at(path)
    file = cache_dir() / "scores" / f"{sha}.json"
    known = read_json_cache(file)
    wanted = [t for t in tasks if f"{t}/{split}" not in known]
    if wanted:
        fresh = evaluate(fetch_model(path).path, wanted, split)
        known = update_json_cache(file, {f"{t}/{split}": v for t, v in fresh.items()})
    return {t: known[f"{t}/{split}"] for t in tasks}
