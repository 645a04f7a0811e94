"""Spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param, TensorChunks

DOT_THRESHOLD = 0.9995


def slerp_coefficients(gram: np.ndarray, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """(a, b) with θ = a·θ0 + b·θ1 for the angle Ω between the flattened tensors:
    a = sin((1−t)Ω)/sin Ω, b = sin(tΩ)/sin Ω; nearly (anti)parallel tensors (|cos Ω| >
    0.9995) interpolate linearly. Norms below eps count as 1, as in mergekit."""
    norm_a, norm_b = (math.sqrt(max(float(gram[i, i]), 0.0)) for i in (0, 1))
    norm_a, norm_b = (n if n > eps else 1.0 for n in (norm_a, norm_b))
    cos = max(-1.0, min(1.0, float(gram[0, 1]) / (norm_a * norm_b)))
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def _statistic(tensor: TensorChunks, params: Mapping[str, Any]) -> tuple[float, float]:
    return slerp_coefficients(P.gram(tensor, from_base=False, base_first=True), float(params["t"]))


def _merge(chunk: Chunk) -> np.ndarray:
    a, b = chunk.stats
    merged = chunk.models[0]
    merged *= np.float32(b)
    merged += np.float32(a) * chunk.base
    return merged


SLERP = MergeMethod(
    name="slerp",
    summary="Spherical interpolation between the base (t=0) and one other model (t=1).",
    formula="θ = sin((1−t)Ω)/sin Ω · θ0 + sin(tΩ)/sin Ω · θ1,  cos Ω = ⟨θ0, θ1⟩/(|θ0||θ1|)",
    merge=_merge,
    params=(
        Param(
            "t",
            None,
            "interpolation factor: 0 is the base, 1 the other model",
            check=lambda x: 0 <= x <= 1,
            check_message="must be in [0, 1]",
        ),
    ),
    min_models=1,
    max_models=1,
    chunk_statistic=_statistic,
    whole_rows=True,
)
