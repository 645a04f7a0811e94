"""Means on the hypersphere (mergekit's multislerp and karcher). Both treat each model's whole
tensor as one vector: its direction comes from a weighted mean on the unit sphere, its length
from the weighted mean of the models' norms. Every quantity they need is an inner product of
two models' tensors, so the statistic is one Gram matrix accumulated over chunks (float64),
from which a few scalars per tensor follow; the merge is then a linear combination of the
models, chunk by chunk."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mergeflow.errors import ConfigError
from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param, TensorChunks
from mergeflow.methods.linear import combine


def multislerp_coefficients(gram: np.ndarray, weights: np.ndarray, normalize: bool, eps: float) -> np.ndarray:
    """a with merged τ = Σi ai·τi, for task vectors (or models) τi with Gram matrix `gram`.

    mergekit projects the unit vectors ui = τi / (‖τi‖ + eps) onto the tangent space at their
    normalised weighted mean m̂ = Σ wi·ui / ‖Σ wi·ui‖, averages there and maps back. The
    weighted mean of those tangent vectors is zero (Σ wi·(ui − (ui·m̂)·m̂) = ‖m‖·m̂ − ‖m‖·m̂), so
    the result is m̂ scaled by the weighted mean norm Σ wi·‖τi‖. A single model is returned as
    it is (a = 1); a zero mean of two models falls back to Σ wi·τi, as mergekit does. Task
    vectors that are all zero (a tensor no model changed) give the base, where mergekit refuses
    more than two."""
    n = len(weights)
    if n == 1:
        return np.ones(1)
    if normalize and weights.sum() == 0:
        raise ValueError("the weights sum to 0 and normalize_weights divides by their sum")
    w = weights / weights.sum() if normalize else weights
    norms = np.sqrt(np.maximum(gram.diagonal(), 0))
    if not norms.any():
        return np.zeros(n)
    scaled = w / (norms + eps)  # m = Σ scaled_i · τi
    mean_norm = math.sqrt(max(float(scaled @ gram @ scaled), 0.0))
    if mean_norm < eps:
        if n == 2:
            return w
        raise ValueError(
            "the weighted mean of the models' directions is zero (opposite task vectors with "
            "weights that cancel); change the weights"
        )
    return scaled * (float(w @ norms) / mean_norm)


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """a with merged θ = Σk ak·θk: mergekit's Karcher mean of the points θk (equal weights) on
    the unit sphere, run on their Gram matrix. Every iterate is a combination of the unit
    vectors uk = θk / ‖θk‖, so it is held as its coefficients c (mean = Σ ck·uk) and each inner
    product is cᵀ·U·c with U the Gram matrix of the uk: the same steps as mergekit's, in
    float64. The result has the length of the points' mean norm."""
    n = gram.shape[0]
    if n == 1:
        return np.ones(1)
    norms = np.sqrt(np.maximum(gram.diagonal(), 0))
    valid = norms > tol
    if not valid.any():
        return np.zeros(n)
    inverse = np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 0.0)
    units = gram * np.outer(inverse, inverse)  # Gram matrix of the uk
    alpha = np.where(valid, 1 / valid.sum(), 0.0)

    def norm(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    mean_norm = norm(alpha)
    mean = np.where(np.arange(n) == np.argmax(valid), 1.0, 0.0) if mean_norm < tol else alpha / mean_norm
    for _ in range(max_iter):
        dots = np.clip(units @ mean, -1.0, 1.0)
        angles = np.arccos(dots)
        moving = valid & (angles >= tol)
        factors = np.where(moving, alpha * angles / np.where(moving, np.sin(angles), 1), 0.0)
        tangent = factors - float(factors @ dots) * mean
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm
        if (length := norm(mean)) > tol:
            mean = mean / length
    return float(norms.mean()) * mean * inverse


def _multislerp_statistic(tensor: TensorChunks, params: Mapping[str, Any]) -> np.ndarray:
    gram = P.gram(tensor, from_base=tensor.has_base)
    weights = np.asarray(params["weight"], np.float64)
    try:
        return multislerp_coefficients(gram, weights, bool(params["normalize_weights"]), float(params["eps"]))
    except ValueError as problem:
        raise ConfigError(f"tensor '{tensor.name}': {problem}") from None


def _multislerp_merge(chunk: Chunk) -> np.ndarray:
    return combine(chunk.models, chunk.base, chunk.stats, chunk.storage)


def _karcher_statistic(tensor: TensorChunks, params: Mapping[str, Any]) -> np.ndarray:
    gram = P.gram(tensor, from_base=False, base_first=tensor.has_base)
    return karcher_coefficients(gram, int(params["max_iter"]), float(params["tol"]))


def _karcher_merge(chunk: Chunk) -> np.ndarray:
    """Σk ak·θk over the points: the base first when there is one (mergekit's entries)."""
    a = chunk.stats.astype(np.float32)
    if chunk.base is None:
        return combine(chunk.models, None, a)
    merged = combine(chunk.models, None, a[1:])
    merged += a[0] * P.to_float32(chunk.base)
    return merged


def _positive(x: float) -> bool:
    return x > 0


WEIGHT = Param("weight", 1.0, "weight of this model", per_model=True)

MULTISLERP = MergeMethod(
    name="multislerp",
    summary="Weighted mean direction on the hypersphere, at the models' weighted mean norm.",
    formula="θ = θ0 + (Σi wi‖τi‖)·m / ‖m‖,  m = Σi wi·τi / (‖τi‖ + eps)  (τi = θi without a base)",
    merge=_multislerp_merge,
    params=(
        WEIGHT,
        Param("normalize_weights", True, "divide the weights by their sum", kind=bool),
        Param("eps", 1e-8, "added to norms before dividing", check=_positive, check_message="must be > 0"),
    ),
    needs_base=False,
    optional_base=True,
    chunk_statistic=_multislerp_statistic,
    reads_bfloat16=True,
    writes_storage=True,
    whole_rows=True,
)

KARCHER = MergeMethod(
    name="karcher",
    summary="Karcher (Riemannian) mean of the models on the hypersphere, at their mean norm.",
    formula="θ = mean‖θk‖ · argmin_u Σk d(u, θk/‖θk‖)²  (the base is one of the points θk)",
    merge=_karcher_merge,
    params=(
        Param(
            "max_iter",
            10,
            "iterations of the mean at most",
            kind=int,
            check=lambda x: x >= 0 and float(x).is_integer(),
            check_message="must be a non-negative integer",
        ),
        Param("tol", 1e-5, "stop when the step is shorter", check=_positive, check_message="must be > 0"),
    ),
    needs_base=False,
    optional_base=True,
    chunk_statistic=_karcher_statistic,
    reads_bfloat16=True,
    whole_rows=True,
)
