"""mergekit's NearSwap: take the other model's value where it is close to the base's, and
move towards it less the further apart they are."""

from __future__ import annotations

import numpy as np

from mergeflow.methods.base import Chunk, MergeMethod, Param


def _merge(chunk: Chunk) -> np.ndarray:
    base, other = chunk.base, chunk.models[0]
    distance = np.abs(base - other)
    np.maximum(distance, np.float32(1e-6), out=distance)
    weight = np.float32(chunk.params["t"]) / distance
    np.clip(weight, 0, 1, out=weight)
    merged = weight * other
    merged += (1 - weight) * base
    return merged


NEARSWAP = MergeMethod(
    name="nearswap",
    summary="Per entry, move from the base to the other model by t / |θ1 − θ0|, at most all the way.",
    formula="θ = w·θ1 + (1−w)·θ0,  w = clamp(t / max(|θ1 − θ0|, 1e-6), 0, 1)",
    merge=_merge,
    params=(Param("t", None, "distance up to which the other model's value is taken whole"),),
    min_models=1,
    max_models=1,
)
