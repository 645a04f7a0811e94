"""Model Stock (Jang et al. 2024): move from the base towards the models' average by a ratio
set from the angle between their task vectors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param, TensorChunks


def interpolation_ratio(gram: np.ndarray) -> float:
    """t = N·c / (1 + (N−1)·c), c = mean pairwise cosine of the task vectors (from their
    Gram matrix). A near-singular denominator (|·| < 1e-6) keeps the base: t = 0."""
    n = gram.shape[0]
    norms = np.sqrt(np.maximum(gram.diagonal(), 0))
    cosines = [
        np.clip(gram[i, j] / max(norms[i] * norms[j], 1e-6), -1, 1) for i in range(n) for j in range(i + 1, n)
    ]
    c = float(np.mean(cosines))
    denominator = 1 + (n - 1) * c
    return 0.0 if abs(denominator) < 1e-6 else n * c / denominator


def _statistic(tensor: TensorChunks, params: Mapping[str, Any]) -> float:
    return interpolation_ratio(P.gram(tensor, from_base=True))


def _merge(chunk: Chunk) -> np.ndarray:
    t = chunk.stats
    average = P.ordered_sum(chunk.models)
    average /= np.float32(chunk.models.shape[0])
    average *= np.float32(t)
    average += np.float32(1 - t) * chunk.base
    return average


MODEL_STOCK = MergeMethod(
    name="model_stock",
    summary="Interpolate base → models' average by a ratio from the task vectors' angle.",
    formula="θ = t·mean(θi) + (1−t)·θ0,  t = N·cos / (1 + (N−1)·cos)",
    merge=_merge,
    params=(
        Param(
            "filter_wise",
            False,
            "per-row ratios (not supported; must be false)",
            kind=bool,
            check=lambda x: not x,
            check_message="true is not supported by mergeflow",
        ),
    ),
    min_models=2,
    chunk_statistic=_statistic,
    whole_rows=True,
    notes=("cos is the mean over model pairs of the cosine between whole-tensor task vectors.",),
)
