"""SCE (Wan et al. 2024, FuseChat): select the task-vector entries that vary most across the
models, weight each model by its task vector's energy, erase entries against the elected sign.

For each tensor, with base θ0, models θi and task vectors τi = θi − θ0:
  1. select: with select_topk < 1, keep the entries with the k = ⌊select_topk · #{v > 0}⌋
     largest variances v = Var_i(τi) (across the models, population variance), the same entries
     in every model; entries tied with the k-th largest are all kept (mergekit's top-k breaks
     ties arbitrarily); k = 0 keeps none;
  2. calculate: wi = mean(τi²) / Σj mean(τj²) over the selected task vectors, uniform 1/N when
     that sum is below 1e-6 (mergekit's guard, an absolute one);
  3. erase: elect γ = sign(Σi τi) (>= 0 counts as +); an entry counts where it is non-zero with
     sign γ;
  4. θ = θ0 + Σi wi·τi·[sign = γ] / max(Σi wi·[sign = γ], 1e-6).
Variances are float32, from the differences to the first model's task vector (two passes: mean,
then squared deviations), so entries equal in every model have variance exactly 0; the squares
are summed in float64 row by row, so the weights do not depend on the chunking or the thread
count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from mergeflow.methods import primitives as P
from mergeflow.methods import statistic_kernels as S
from mergeflow.methods.base import Chunk, MergeMethod, Param, TensorChunks
from mergeflow.methods.kernels import BLOCK, stored, widen

WEIGHT_GUARD = 1e-6  # mergekit's: weights sum and agreeing-weights floor


@dataclass(frozen=True)
class Selection:
    """One tensor's SCE statistic: its variances (empty when nothing is selected away), the
    threshold an entry's variance must reach (−inf: all kept; +inf: none), the weights [N]."""

    variances: np.ndarray
    threshold: float
    weights: np.ndarray


def _statistic(tensor: TensorChunks, params: Mapping[str, Any]) -> Selection:
    select_topk = float(params["select_topk"])
    variances, threshold = np.empty(0, np.float32), -np.inf
    if select_topk < 1:
        variances = tensor.scratch()
        for start, base, models in tensor.chunks():
            variances_(variances[start : start + models.shape[1]], models, base)
        k = int(np.count_nonzero(variances) * select_topk)
        threshold = P.Magnitudes(variances, None).kth_largest(k) if k else np.inf
    totals = np.zeros(tensor.n_models, np.float64)
    for start, base, models in tensor.chunks():
        count = models.shape[1]
        sums = np.empty((tensor.n_models, count // tensor.row_length), np.float64)
        kept = variances[start : start + count] if variances.size else variances
        kept_square_sums_(sums, models, base, kept, threshold, tensor.row_length)
        S.add_rows_in_order_(totals, sums.T)
    means = totals / max(tensor.numel, 1)
    total = sum(means.tolist())
    with np.errstate(invalid="ignore"):  # Inf in an input: the merge refuses it when it reads that chunk
        weights = (
            means / total if abs(total) >= WEIGHT_GUARD else np.full(tensor.n_models, 1 / tensor.n_models)
        )
    return Selection(variances, threshold, weights.astype(np.float32))


def _merge(chunk: Chunk) -> np.ndarray:
    selection: Selection = chunk.stats
    count = chunk.models.shape[1]
    variances = selection.variances
    if variances.size:
        variances = variances[chunk.start : chunk.start + count]
    out = np.empty(count, chunk.storage)
    non_finite, non_finite_out = merge_(
        out, P.kernel_array(chunk.models), chunk.base, variances, np.float32(selection.threshold),
        selection.weights,
    )  # fmt: skip
    P.refuse_non_finite(non_finite, non_finite_out)
    return out


SCE = MergeMethod(
    name="sce",
    summary="Keep the entries that vary most across models, weight models by energy, erase, average.",
    formula="θ = θ0 + Σi wi·sel(τi)·[sign = γ] / Σi wi·[sign = γ],  wi ∝ mean(sel(τi)²)",
    merge=_merge,
    params=(
        Param(
            "select_topk",
            1.0,
            "fraction of entries kept, by their variance across the models",
            check=lambda x: 0 < x <= 1,
            check_message="must be in (0, 1]",
        ),
        Param("int8_mask", False, "accepted for mergekit configs; no effect", kind=bool),
    ),
    chunk_statistic=_statistic,
    reads_bfloat16=True,
    writes_storage=True,
    whole_rows=True,
    notes=(
        "Entries tied with the k-th largest variance are all kept.",
        "Weights come from float64 sums of the selected squares over the whole tensor.",
    ),
)


# --- kernels (see kernels.py for how they read bfloat16 and write the output's storage) ---


@njit(parallel=True, cache=True)
def variances_(out, models, base):
    """out[j] = Σi (di[j] − m)² / N with di = τi − τ0 (τi = models[i] − base) and m = Σi di[j] / N:
    the variance of the τi, from their differences to the first one, so entries where every
    model has the same value get exactly 0 (as torch.var gives; a mean of equal float32 values
    need not equal them). float32, models in order."""
    n_models, count = models.shape
    n = np.float32(n_models)
    for block in prange((count + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        size = min(count, lo + BLOCK) - lo
        block_base, block_out, first = base[lo : lo + size], out[lo : lo + size], models[0, lo : lo + size]
        tau0 = np.empty(size, np.float32)
        for j in range(size):
            tau0[j] = widen(first[j]) - widen(block_base[j])
        mean = np.zeros(size, np.float32)
        for i in range(1, n_models):
            model = models[i, lo : lo + size]
            for j in range(size):
                mean[j] += (widen(model[j]) - widen(block_base[j])) - tau0[j]
        for j in range(size):
            mean[j] /= n
        squares = np.zeros(size, np.float32)
        for i in range(n_models):
            model = models[i, lo : lo + size]
            for j in range(size):
                d = ((widen(model[j]) - widen(block_base[j])) - tau0[j]) - mean[j]
                squares[j] += d * d
        for j in range(size):
            block_out[j] = squares[j] / n


@njit(parallel=True, cache=True)
def kept_square_sums_(sums, models, base, variances, threshold, row_length):
    """sums[i, r] = Σ τi[j]² over row r (float64, in element order), counting only the
    entries whose variance is not below `threshold` when `variances` is given (else all)."""
    n_models, count = models.shape
    select = variances.size > 0
    for r in prange(count // row_length):
        lo = r * row_length
        row_base = base[lo : lo + row_length]
        row_variances = variances[lo : lo + row_length] if select else variances
        for i in range(n_models):
            model = models[i, lo : lo + row_length]
            total = 0.0
            for j in range(row_length):
                tau = np.float64(widen(model[j]) - widen(row_base[j]))
                if not select or not row_variances[j] < threshold:
                    total += tau * tau
            sums[i, r] = total


@njit(parallel=True, cache=True)
def merge_(out, models, base, variances, threshold, weights):
    """out = θ0 + Σi wi·τi·[agrees] / max(Σi wi·[agrees], 1e-6), τi zeroed where its variance
    is below `threshold` (when `variances` is given); stored as `out` stores it. Returns how
    many task-vector entries and how many merged values are NaN or ±Inf."""
    n_models, count = models.shape
    select = variances.size > 0
    non_finite = non_finite_out = 0
    for block in prange((count + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        size = min(count, lo + BLOCK) - lo
        block_base, block_out = base[lo : lo + size], out[lo : lo + size]
        block_variances = variances[lo : lo + size] if select else variances
        taus = np.empty((n_models, size), np.float32)
        vote = np.zeros(size, np.float32)
        bad = bad_out = 0
        for i in range(n_models):
            model = models[i, lo : lo + size]
            for j in range(size):
                tau = widen(model[j]) - widen(block_base[j])
                bad += tau - tau != 0  # true exactly for NaN and ±Inf
                if select and block_variances[j] < threshold:
                    tau = np.float32(0.0)
                taus[i, j] = tau
                vote[j] += tau
        total = np.zeros(size, np.float32)
        agreeing = np.zeros(size, np.float32)
        for i in range(n_models):
            w = weights[i]
            for j in range(size):
                x = taus[i, j]
                agrees = (x > 0) if vote[j] >= 0 else (x < 0)
                total[j] += x * w if agrees else np.float32(0.0)
                agreeing[j] += w if agrees else np.float32(0.0)
        for j in range(size):
            value = widen(block_base[j]) + total[j] / max(agreeing[j], np.float32(WEIGHT_GUARD))
            bad_out += value - value != 0
            block_out[j] = stored(value, block_out)
        non_finite += bad
        non_finite_out += bad_out
    return non_finite, non_finite_out
