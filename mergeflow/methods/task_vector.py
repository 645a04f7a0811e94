"""Task-vector merges: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA are one
procedure with different sparsification and consensus steps (as in mergekit).

For each tensor, with base θ0, models θi, task vectors τi = θi − θ0 and weights wi:
  1. sparsify each τi: `magnitude` (TIES trim: keep the top `density` by |τi|), `random`
     (DARE: keep each entry with probability `density`), `outliers` (Breadcrumbs: drop the
     top `gamma` and the smallest, keep `density`), `ranked` (DELLA: keep each entry with a
     probability from density − ε to density + ε by its |τi| rank in its row), or none;
  2. weight: τi ← wi · τi (weights apply before sign election, as in mergekit);
  3. combine: with consensus, elect γ = sign(Σi τi) (>= 0 counts as +) and sum only the
     entries whose sign equals γ; otherwise sum all;
  4. if `normalize`, divide by the summed weights of the contributing models;
  5. θ = θ0 + λ · result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param

Sparsify = Literal["magnitude", "random", "outliers", "ranked"] | None


def _model_statistic(sparsify: Sparsify):
    """Per-model whole-tensor statistic from |τi|: trim bounds plus the L1 rescale factor."""

    def statistic(magnitudes: P.Magnitudes, params: Mapping[str, float]) -> np.ndarray:
        if sparsify == "magnitude":
            low, high = P.magnitude_threshold(magnitudes, params["density"]), float("inf")
        else:
            low, high = P.breadcrumbs_bounds(magnitudes, params["density"], params["gamma"])
        scale = 1.0
        if params["rescale"]:
            values = magnitudes.values()
            kept = values[(values >= np.float32(low)) & (values <= np.float32(high))]
            before = float(values.sum(dtype=np.float64))
            after = float(kept.sum(dtype=np.float64))
            if before >= 1e-7 and after >= 1e-7:
                scale = before / after
        return np.array([low, high, scale], dtype=np.float32)

    return statistic


def _merge(sparsify: Sparsify, consensus: bool):
    def merge(chunk: Chunk) -> np.ndarray:
        p = chunk.params
        sparsified: dict = {}
        if sparsify in ("random", "ranked"):  # DELLA draws from DARE's streams
            density = p["density"]
            keys = [P.dare_key(int(p["seed"]), chunk.tensor_name, i) for i in range(len(density))]
            sparsified = dict(keys=keys, start=chunk.start)
        if sparsify == "random":
            sparsified |= dict(density=density, scale=1 / density if p["rescale"] else None)
        elif sparsify == "ranked":
            chances = P.della_chances(chunk.models, chunk.base, chunk.row_length, density, p["epsilon"])
            sparsified |= dict(chances=chances, rescale_by_chance=bool(p["rescale"]))
        elif sparsify is not None:
            low, high, scale = chunk.stats.T
            sparsified = dict(low=low, high=high, scale=scale if p["rescale"] else None)
        return P.merge_task_vectors(
            chunk.models, chunk.base, p["weight"], consensus=consensus, normalize=bool(p["normalize"]),
            lam=float(p["lambda"]), storage=chunk.storage, **sparsified,
        )  # fmt: skip

    return merge


def _in_unit_interval(x: float) -> bool:
    return 0 < x <= 1


WEIGHT = Param("weight", 1.0, "scale of this model's task vector", per_model=True)
DENSITY = Param(
    "density",
    1.0,
    "fraction of task-vector entries kept",
    per_model=True,
    check=_in_unit_interval,
    check_message="must be in (0, 1]",
)


def _per_model_fraction(name: str, default: float, description: str) -> Param:
    """A per-model parameter in [0, 1)."""
    return Param(
        name,
        default,
        description,
        per_model=True,
        check=lambda x: 0 <= x < 1,
        check_message="must be in [0, 1)",
    )


GAMMA = _per_model_fraction("gamma", 0.01, "fraction of largest-magnitude entries dropped")
EPSILON = _per_model_fraction(
    "epsilon", 0.15, "keep chances run from density − ε (smallest |τ| in a row) to density + ε (largest)"
)
LAMBDA = Param("lambda", 1.0, "scale λ of the merged task vector")
SEED = Param(
    "seed",
    0,
    "seed of the random drop masks",
    kind=int,
    check=lambda x: x >= 0 and float(x).is_integer(),
    check_message="must be a non-negative integer",
)
INT8_MASK = Param("int8_mask", False, "accepted for mergekit configs; no effect", kind=bool)


def _flag(name: str, default: bool, description: str) -> Param:
    return Param(name, default, description, kind=bool)


def task_vector_method(
    name: str,
    summary: str,
    formula: str,
    sparsify: Sparsify,
    consensus: bool,
    normalize: bool,
    rescale: bool,
) -> MergeMethod:
    params = [WEIGHT, LAMBDA, _flag("normalize", normalize, "divide by the summed weights")]
    if sparsify is not None:
        params += [DENSITY, _flag("rescale", rescale, _RESCALE[sparsify]), INT8_MASK]
    if sparsify == "outliers":
        params.append(GAMMA)
    if sparsify == "ranked":
        params.append(EPSILON)
    if sparsify in ("random", "ranked"):
        params.append(SEED)
    statistic = _model_statistic(sparsify) if sparsify in ("magnitude", "outliers") else None
    return MergeMethod(
        name=name,
        summary=summary,
        formula=formula,
        merge=_merge(sparsify, consensus),
        params=tuple(params),
        model_statistic=statistic,
        reads_bfloat16=True,
        writes_storage=True,
        whole_rows=sparsify == "ranked",
        parameter_check=_chances_within_0_1 if sparsify == "ranked" else None,
    )


def _chances_within_0_1(params: Mapping[str, Any]) -> tuple[int, str] | None:
    """DELLA's keep chances density ± ε must lie in (0, 1) where a model is pruned (mergekit
    refuses the same); density >= 1 keeps every entry whatever ε."""
    for i, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"], strict=True)):
        density, epsilon = float(density), float(epsilon)
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            return i, (
                f"density {density:g} ± epsilon {epsilon:g} leaves (0, 1): DELLA keeps "
                "entries with chances from density − epsilon to density + epsilon"
            )
    return None


_RESCALE = {
    "magnitude": "rescale kept entries to the task vector's L1 norm",
    "outliers": "rescale kept entries to the task vector's L1 norm",
    "random": "multiply kept entries by 1/density",
    "ranked": "divide kept entries by their keep chance",
}
