"""mergekit's Arcee Fusion: take the other model's value where its change from the base matters
most, judged by how far apart the two models' rows are as distributions.

For each tensor, with base θ0 and one other model θ1, τ = θ1 − θ0:
  1. importance e = |τ| · KL(p ‖ q) of the entry's row, with p = softmax(θ1's row) + 1e-8 and
     q = softmax(θ0's row) + 1e-8 (rows are the last dimension; a 1-D tensor is one row);
  2. threshold t = Q2 + 1.5·(Q3 − Q1) over the whole tensor's importances, Qk the element of
     the ascending order at index ⌊k·(n − 1)/4⌋ (no interpolation, as mergekit indexes its sort);
  3. θ = θ0 + τ·[e ≥ t].
mergekit takes the quartiles of a random sample of 1M entries for larger tensors, so its merges
of those are not reproducible; mergeflow takes the exact ones, which the sample estimates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, TensorChunks
from mergeflow.methods.kernels import stored, widen

SOFTMAX_FLOOR = 1e-8  # mergekit's: added to both distributions before the logarithm


@dataclass(frozen=True)
class Fusion:
    """One tensor's statistic: KL of each row, and the importance threshold."""

    row_kl: np.ndarray  # float32 [rows]
    threshold: float


def _statistic(tensor: TensorChunks, params: Mapping[str, Any]) -> Fusion:
    importance = tensor.scratch()
    row_kl = np.empty(tensor.numel // tensor.row_length, np.float32)
    for start, base, models in tensor.chunks():
        count, first_row = models.shape[1], start // tensor.row_length
        rows = slice(first_row, first_row + count // tensor.row_length)
        model = P.kernel_array(models)[0]
        importance_(importance[start : start + count], row_kl[rows], model, base, tensor.row_length)
    # The quartiles: the entries at ascending index ⌊k·(n − 1)/4⌋, as k-th largest ones (every
    # importance is >= 0, which the selection by bit pattern needs).
    last, magnitudes = tensor.numel - 1, P.Magnitudes(importance, None)
    q1, median, q3 = (
        np.float32(magnitudes.kth_largest(tensor.numel - index))
        for index in (last // 4, last // 2, 3 * last // 4)
    )
    return Fusion(row_kl, float(median + np.float32(1.5) * (q3 - q1)))  # float32 arithmetic, as mergekit's


def _merge(chunk: Chunk) -> np.ndarray:
    fusion: Fusion = chunk.stats
    count, first_row = chunk.models.shape[1], chunk.start // chunk.row_length
    row_kl = fusion.row_kl[first_row : first_row + count // chunk.row_length]
    out = np.empty(count, chunk.storage)
    model = P.kernel_array(chunk.models)[0]
    non_finite, non_finite_out = merge_(
        out, model, chunk.base, chunk.row_length, row_kl, np.float32(fusion.threshold)
    )
    P.refuse_non_finite(non_finite, non_finite_out)
    return out


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    summary="Take the other model's changes whose importance |τ|·KL(rows) is an upper outlier.",
    formula="θ = θ0 + τ·[e ≥ Q2 + 1.5·(Q3 − Q1)],  e = |τ|·KL(softmax(θ1 row) ‖ softmax(θ0 row))",
    merge=_merge,
    min_models=1,
    max_models=1,
    chunk_statistic=_statistic,
    reads_bfloat16=True,
    writes_storage=True,
    whole_rows=True,
    notes=(
        "Quartiles are exact (mergekit samples 1M entries of larger tensors).",
        "Softmax and KL are summed in float64, row by row; KL below 0 (rounding) counts as 0.",
    ),
)


# --- kernels (see kernels.py for how they read bfloat16 and write the output's storage) ---


@njit(cache=True)
def _row_kl(model, base, shifted_model, shifted_base):
    """KL(p ‖ q) of one row, p = softmax(model) + 1e-8, q = softmax(base) + 1e-8, at least 0
    (it is, but for rounding); float64 sums in element order, so the value does not depend on
    the chunking or the threads. `shifted_*` are float64 scratch of the row's length."""
    n = model.size
    top_p = top_q = -math.inf
    for j in range(n):
        shifted_model[j] = widen(model[j])
        shifted_base[j] = widen(base[j])
        top_p = max(top_p, shifted_model[j])
        top_q = max(top_q, shifted_base[j])
    sum_p = sum_q = 0.0
    for j in range(n):
        shifted_model[j] = math.exp(shifted_model[j] - top_p)
        shifted_base[j] = math.exp(shifted_base[j] - top_q)
        sum_p += shifted_model[j]
        sum_q += shifted_base[j]
    kl = 0.0
    for j in range(n):
        p = shifted_model[j] / sum_p + SOFTMAX_FLOOR
        q = shifted_base[j] / sum_q + SOFTMAX_FLOOR
        kl += p * math.log(p / q)
    return np.float32(max(kl, 0.0))


@njit(parallel=True, cache=True)
def importance_(out, row_kl, model, base, row_length):
    """row_kl[r] = KL of row r, out = |τ| · KL of the entry's row, for whole rows."""
    for r in prange(model.size // row_length):
        lo = r * row_length
        row_model, row_base = model[lo : lo + row_length], base[lo : lo + row_length]
        scratch = np.empty((2, row_length), np.float64)
        kl = _row_kl(row_model, row_base, scratch[0], scratch[1])
        row_kl[r] = kl
        for j in range(row_length):
            out[lo + j] = abs(widen(row_model[j]) - widen(row_base[j])) * kl


@njit(parallel=True, cache=True)
def merge_(out, model, base, row_length, row_kl, threshold):
    """out = θ0 + τ·[|τ|·KL(row) ≥ threshold], stored as `out` stores it. Returns how many
    task-vector entries and how many merged values are NaN or ±Inf."""
    non_finite = non_finite_out = 0
    for r in prange(model.size // row_length):
        lo, kl = r * row_length, row_kl[r]
        bad = bad_out = 0
        for j in range(lo, lo + row_length):
            theta0 = widen(base[j])
            tau = widen(model[j]) - theta0
            bad += tau - tau != 0  # true exactly for NaN and ±Inf
            kept = np.float32(1.0) if abs(tau) * kl >= threshold else np.float32(0.0)
            value = theta0 + tau * kept
            bad_out += value - value != 0
            out[j] = stored(value, out)
        non_finite += bad
        non_finite_out += bad_out
    return non_finite, non_finite_out
