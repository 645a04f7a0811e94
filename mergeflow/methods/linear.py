"""Weight averaging (mergekit's `linear`): θ = Σi wi θi / Σi wi."""

from __future__ import annotations

import numpy as np

from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param


def weighted_average(
    models: np.ndarray, weights: np.ndarray, normalize: bool, storage: type = np.float32
) -> np.ndarray:
    """Σi wi θi, divided by Σi wi when `normalize` (|Σ w| < 1e-8 divides as 1), as `storage`
    (see primitives.merge_task_vectors)."""
    return P.merge_task_vectors(
        models, None, weights, consensus=False, normalize=normalize, lam=1.0, storage=storage
    )


def combine(
    models: np.ndarray, base: np.ndarray | None, coefficients: np.ndarray, storage: type = np.float32
) -> np.ndarray:
    """θ0 + Σi ai·(θi − θ0), or Σi ai·θi without a base: one fused pass, as `storage`."""
    a = np.asarray(coefficients, np.float32)
    if base is None:
        return weighted_average(models, a, normalize=False, storage=storage)
    return P.merge_task_vectors(models, base, a, consensus=False, normalize=False, lam=1.0, storage=storage)


def _merge(chunk: Chunk) -> np.ndarray:
    p = chunk.params
    return weighted_average(chunk.models, p["weight"], bool(p["normalize"]), chunk.storage)


AVERAGE = MergeMethod(
    name="average",
    summary="Weighted average of the models' weights (the paper's Averaging).",
    formula="θ = Σi wi·θi / Σi wi",
    merge=_merge,
    params=(
        Param("weight", 1.0, "weight of this model in the average", per_model=True),
        Param("normalize", True, "divide by the summed weights", kind=bool),
    ),
    needs_base=False,
    reads_bfloat16=True,
    writes_storage=True,
    notes=(
        "`linear` is the same method under mergekit's name. A base model is not averaged "
        "unless it is also listed under `models`.",
    ),
)
