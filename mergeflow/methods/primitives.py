"""Small pure tensor functions the merge methods are built from.

Every function is deterministic: results do not depend on how a tensor is split into chunks or
on the number of threads. Sums across models run in model order; the hot loops are fused
numba kernels (`kernels.py`) called on zero-copy numpy views of float32 tensors.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from mergeflow.methods import kernels as K

_EXACT_SELECT_MAX = 1 << 16  # below this many elements, select with kthvalue directly
_SAMPLE_STRIDE = 32  # sample about one entry in 32 ...
_SAMPLE_MAX = 1 << 20  # ... but at most this many


class NonFiniteInput(ValueError):
    """A NaN or Inf reached a kernel; the engine finds and names the model and tensor."""


def ordered_sum(stacked: Tensor) -> Tensor:
    """Sum over dim 0 in index order, so the result is the same for any chunking."""
    total = stacked[0].clone()
    for row in stacked[1:]:
        total += row
    return total


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The exact k-th largest entry of a 1-D float32 tensor without NaN (k >= 1).

    Large tensors are bracketed [lo, hi] from an evenly spread sample of ~1/32 of the entries;
    one scan counts the entries above hi and gathers those inside the bracket (~1% of them),
    and the answer is selected exactly among those. The sample only affects speed, never the
    result.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n <= _EXACT_SELECT_MAX:
        return torch.kthvalue(values, n - k + 1).values
    array = values.contiguous().numpy()
    # A prime stride spreads the sample over rows and columns alike.
    sample = array[:: _prime_at_least(max(2, n // _SAMPLE_MAX, _SAMPLE_STRIDE))].copy()
    m = sample.size
    position = (1 - k / n) * (m - 1)
    # ~4 sigma of a sample quantile: the bracket misses once in ~15,000 selections.
    margin = 4 * (m * (k / n) * (1 - k / n)) ** 0.5 + 16
    first, last = max(0, int(position - margin)), min(m - 1, int(position + margin) + 1)
    sample.partition([first, last])
    # Room for twice the expected band in each slice: only a sample far off overflows it.
    capacity = 2 * int((last - first + 1) / m * n) + 1024
    above, band = K.above_and_band(array, sample[first], sample[last], numba.get_num_threads(), capacity)
    rank = k - above  # rank of the answer from the top of the band
    if band is not None and 1 <= rank <= band.size:
        return torch.tensor(np.partition(band, band.size - rank)[band.size - rank])
    return torch.kthvalue(values, n - k + 1).values  # the sample missed: select the slow way


def _prime_at_least(x: int) -> int:
    x = max(x, 2)
    while any(x % d == 0 for d in range(2, int(x**0.5) + 1)):
        x += 1
    return x


def magnitude_threshold(magnitudes: Tensor, density: float) -> Tensor:
    """TIES trim threshold over `magnitudes` = |τ|: entries with |τ| >= threshold are kept.

    k = max(1, floor(density * n)) entries are kept (mergekit's rounding; PEFT uses floor
    without the minimum of one, which only differs when density * n < 1). Entries tied with
    the k-th largest magnitude are all kept, so with exact ties slightly more than k survive;
    a top-k by index would break such ties arbitrarily and depend on chunking.
    density >= 1 keeps everything (threshold 0).
    """
    if density >= 1:
        return torch.tensor(0.0)
    magnitudes = magnitudes.reshape(-1)
    return kth_largest(magnitudes, max(1, int(density * magnitudes.numel())))


def breadcrumbs_bounds(magnitudes: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs band [low, high] over `magnitudes` = |τ|: drop the largest `gamma`
    fraction and then the smallest, keeping a `density` fraction (mergekit's
    `magnitude_outliers`).

    With n entries ranked by ascending magnitude, ranks [n_bot, n_bot + floor(density*n)) are
    kept, where n_bot = max(0, n - floor(density*n) - floor(gamma*n)); ties at either bound
    are kept. Returns tensor([low, high]); an empty band is (inf, -inf). density >= 1 keeps all.
    """
    if density >= 1:
        return torch.tensor([0.0, float("inf")])
    magnitudes = magnitudes.reshape(-1)
    n = magnitudes.numel()
    keep = int(density * n)
    if keep == 0:
        return torch.tensor([float("inf"), float("-inf")])
    n_bottom = max(0, n - keep - int(gamma * n))
    low = kth_largest(magnitudes, n - n_bottom)  # ascending rank n_bottom
    high = kth_largest(magnitudes, n - n_bottom - keep + 1)  # ascending rank n_bottom+keep-1
    return torch.stack([low, high])


def dare_key(seed: int, tensor_name: str, model_index: int) -> int:
    """The 64-bit key of one model's DARE stream in one tensor: sha256(seed, name, index)."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def dare_uniforms(key: int, start: int, count: int) -> Tensor:
    """Uniform numbers k/2^24 for flat elements [start, start+count) of one DARE stream.

    Counter-based (SplitMix64 of key + (index+1)·golden ratio), so any chunk of a tensor sees
    exactly the numbers the whole tensor would, on any number of threads.
    """
    out = np.empty(count, dtype=np.float64)
    _uniforms(np.uint64(key), start, out)
    return torch.from_numpy(out)


@njit(parallel=True, cache=True)
def _uniforms(key, start, out):
    for j in prange(out.size):
        out[j] = K.uniform24(key, start + j)


def merge_task_vectors(
    models: Tensor,
    base: Tensor,
    weights: Tensor,
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    low: Tensor | None = None,
    high: Tensor | None = None,
    scale: Tensor | None = None,
    keys: list[int] | None = None,
    density: Tensor | None = None,
    start: int = 0,
) -> Tensor:
    """θ0 + λ·merge of the weighted, sparsified task vectors τi = θi − θ0 of models [N, C].

    Sparsify: with `low`/`high`, keep low[i] <= |τi| <= high[i] (magnitude trim, Breadcrumbs
    band); with `keys`/`density`, DARE: keep each entry with probability density[i], using
    element start + j of stream keys[i]; otherwise keep all. Kept entries are multiplied by
    scale[i] (default 1), then by the weight wi (weights apply before any election).
    Merge: `consensus` is the TIES election (γ = + where Σ wi·τi >= 0) and disjoint merge;
    `normalize` divides by the agreeing models' summed weights (0 divides as 1). Otherwise the
    weighted sum; `normalize` divides by Σ wi (|Σ wi| < 1e-8 divides as 1).
    Raises NonFiniteInput when an input holds NaN or Inf. The models are left unchanged.
    """
    n = models.shape[0]
    mode, no_limits = K.MODE_NONE, np.zeros(n, np.float32)
    if low is not None:
        mode = K.MODE_BAND
    elif keys is not None:
        mode = K.MODE_RANDOM
    total = float(ordered_sum(weights.to(torch.float32)))
    divisor = np.float32(total if normalize and abs(total) >= 1e-8 else 1.0)
    out = torch.empty_like(base)
    non_finite = K.merge_task_vectors(
        models.numpy(), base.numpy(), mode,
        _f32(low, no_limits), _f32(high, no_limits), _f32(scale, np.ones(n, np.float32)),
        np.array(keys or [0] * n, dtype=np.uint64),
        np.asarray(density.numpy() if density is not None else no_limits, dtype=np.float64),
        start, _f32(weights, no_limits), consensus, normalize, divisor, np.float32(lam), out.numpy(),
    )  # fmt: skip
    if non_finite:
        raise NonFiniteInput(f"{non_finite} NaN/Inf value(s) in the task vectors")
    return out


def _f32(tensor: Tensor | None, default: np.ndarray) -> np.ndarray:
    return default if tensor is None else np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
