"""Small pure tensor functions the merge methods are built from.

Every function is deterministic: results do not depend on how a tensor is split into chunks or
on the number of threads. Sums across models run in model order; the hot loops are fused
numba kernels (`kernels.py`). Arrays are numpy: float32, or bfloat16 as its uint16 bit
patterns (numpy has no bfloat16; safetensors_io.DType), widened inside the kernels.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np
from numba import njit, prange

from mergeflow.methods import kernels as K
from mergeflow.methods import statistic_kernels as S
from mergeflow.methods.ranking import ranked_chances_
from mergeflow.safetensors_io import DType


class NonFiniteInput(ValueError):
    """A NaN or Inf reached a kernel; the engine finds and names the model and tensor."""


class NonFiniteOutput(ValueError):
    """Merged values overflowed to ±Inf or became NaN (finite inputs, too large λ or weights)."""


def ordered_sum(stacked: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order, so the result is the same for any chunking."""
    total = stacked[0].copy()
    for row in stacked[1:]:
        total += row
    return total


def gram(tensor, *, from_base: bool, base_first: bool = False) -> np.ndarray:
    """The Gram matrix (float64) over a whole tensor of its vectors: the models, minus the base
    when `from_base`, preceded by the base itself when `base_first`. `tensor` is a
    `TensorChunks` whose chunks hold whole rows: each row's inner products are summed on
    their own, then the rows in order, so the result does not depend on the chunking."""
    n = tensor.n_models + int(base_first)
    total = np.zeros((n, n))
    for _, base, models in tensor.chunks():
        rows = np.empty((models.shape[1] // tensor.row_length, n, n))
        base = np.zeros(0, np.float32) if base is None else base
        S.gram_rows_(rows, kernel_array(models), base, from_base, base_first, tensor.row_length)
        S.add_rows_in_order_(total, rows)
    return total


class Magnitudes:
    """|τ| over one model's whole tensor, computed wherever it is scanned instead of stored:
    |model − base|, or |model| when the model already is a task vector (base None).

    The arrays are what the kernels read: float32, or bfloat16 as uint16 bit patterns (numpy
    has no bfloat16). Use `of` for arrays of any float dtype and shape.
    """

    def __init__(self, model: np.ndarray, base: np.ndarray | None) -> None:
        self.model = model
        self.base = base if base is not None else np.zeros(0, np.float32)
        self.has_base = base is not None
        self.numel = model.size
        self._top_bits: np.ndarray | None = None

    @classmethod
    def of(cls, model: np.ndarray, base: np.ndarray | None = None) -> Magnitudes:
        return cls(kernel_array(model.reshape(-1)), None if base is None else kernel_array(base.reshape(-1)))

    def kth_largest(self, k: int) -> float:
        """The exact k-th largest |τ| (k >= 1), in two scans and no sorting: one counts |τ| by
        the top 16 bits of its float32 bit pattern, which finds the pattern's top half; the
        second counts those with that top half by their bottom 16 bits. The first count is
        kept for the next selection (Breadcrumbs selects twice)."""
        if not 1 <= k <= self.numel:
            raise ValueError(f"k={k} outside [1, {self.numel}]")
        if self._top_bits is None:
            self._top_bits = self._histogram(-1)
        top, above = S.bin_from_the_top(self._top_bits, k)
        bottom, _ = S.bin_from_the_top(self._histogram(top), k - above)
        return float(np.uint32(top << 16 | bottom).view(np.float32))

    def values(self) -> np.ndarray:
        """All |τ| as a float32 array."""
        out = np.empty(self.numel, dtype=np.float32)
        S.magnitudes_(out, self.model, self.base, self.has_base)
        return out

    def _histogram(self, high: int) -> np.ndarray:
        return S.magnitude_histogram(self.model, self.base, self.has_base, high, numba.get_num_threads())


# What the kernels read as it is: float32, and bfloat16 as its uint16 bit patterns.
KERNEL_DTYPES = (np.uint16, np.float32)


def kernel_array(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """An array as the kernels read it, contiguous: a KERNEL_DTYPES array as it is; other
    dtypes converted to float32, into `out` when given."""
    if array.dtype in KERNEL_DTYPES:
        return np.ascontiguousarray(array)
    return to_float32(array, out)


# Arrays smaller than this are converted on the calling thread: waking the kernels' threads
# costs more (the rows of a LoRA factor that one chunk of an adapted tensor needs).
SMALL = 1 << 16


def to_float32(stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of elements as stored (uint16 holds bfloat16 bit patterns), into `out`
    when given (a contiguous buffer, reused: that saves page faults)."""
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if not out.flags.c_contiguous:  # reshape(-1) below would fill a copy
        raise ValueError("to_float32 needs a contiguous output array")
    if stored.dtype == np.uint16 and stored.size < SMALL:
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif stored.dtype == np.uint16:
        K.widen_(out.reshape(-1), np.ascontiguousarray(stored).reshape(-1))
    else:
        np.copyto(out, stored, casting="unsafe")
    return out


def from_float32(values: np.ndarray, dtype: DType) -> tuple[np.ndarray, int]:
    """A new array of float32 `values` in `dtype`'s storage, and how many of the values are NaN
    or ±Inf, counted in the same pass. bfloat16 and float16 are rounded to nearest, ties to
    even (the bits torch gives); beyond float16's range is ±Inf, as in torch."""
    flat = np.ascontiguousarray(values, np.float32).reshape(-1)
    out = np.empty(flat.size, dtype=dtype.storage)
    if dtype.storage is np.uint16:
        non_finite = K.narrow_to_bfloat16_(out, flat)
    elif dtype.storage is np.float32:
        non_finite = K.copy_float32_(out, flat)
    else:
        with np.errstate(over="ignore"):
            out[:] = flat
        non_finite = int(np.count_nonzero(~np.isfinite(flat)))
    return out.reshape(values.shape), int(non_finite)


def magnitude_threshold(magnitudes: Magnitudes, density: float) -> float:
    """TIES trim threshold over `magnitudes` = |τ|: entries with |τ| >= threshold are kept.

    k = max(1, floor(density * n)) entries are kept (mergekit's rounding; PEFT uses floor
    without the minimum of one, which only differs when density * n < 1). Entries tied with
    the k-th largest magnitude are all kept, so with exact ties slightly more than k survive;
    a top-k by index would break such ties arbitrarily and depend on chunking.
    density >= 1 keeps everything (threshold 0).
    """
    if density >= 1:
        return 0.0
    return magnitudes.kth_largest(max(1, int(density * magnitudes.numel)))


def breadcrumbs_bounds(magnitudes: Magnitudes, density: float, gamma: float) -> tuple[float, float]:
    """Model Breadcrumbs band [low, high] over `magnitudes` = |τ|: drop the largest `gamma`
    fraction and then the smallest, keeping a `density` fraction (mergekit's
    `magnitude_outliers`).

    With n entries ranked by ascending magnitude, ranks [n_bot, n_bot + floor(density*n)) are
    kept, where n_bot = max(0, n - floor(density*n) - floor(gamma*n)); ties at either bound
    are kept. Returns (low, high); an empty band is (inf, -inf). density >= 1 keeps all.
    """
    if density >= 1:
        return 0.0, float("inf")
    n = magnitudes.numel
    keep = int(density * n)
    if keep == 0:
        return float("inf"), float("-inf")
    n_bottom = max(0, n - keep - int(gamma * n))
    low = magnitudes.kth_largest(n - n_bottom)  # ascending rank n_bottom
    high = magnitudes.kth_largest(n - n_bottom - keep + 1)  # ascending rank n_bottom+keep-1
    return low, high


def dare_key(seed: int, tensor_name: str, model_index: int) -> int:
    """The 64-bit key of one model's DARE stream in one tensor: sha256(seed, name, index)."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def dare_uniforms(key: int, start: int, count: int) -> np.ndarray:
    """Uniform numbers k/2^24 for flat elements [start, start+count) of one DARE stream.

    Counter-based (SplitMix64 of key + (index+1)·golden ratio), so any chunk of a tensor sees
    exactly the numbers the whole tensor would, on any number of threads.
    """
    out = np.empty(count, dtype=np.float64)
    _uniforms(np.uint64(key), start, out)
    return out


@njit(parallel=True, cache=True)
def _uniforms(key, start, out):
    for j in prange(out.size):
        out[j] = K.uniform24(key, start + j)


def della_chances(
    models: np.ndarray, base: np.ndarray, row_length: int, density: np.ndarray, epsilon: np.ndarray
) -> np.ndarray:
    """DELLA's (MagPrune's) keep probability of every entry of models [N, C] (whole rows of
    `row_length` elements; float32 or bfloat16 bit patterns, the base too), as [N, C] float32.

    Within each row, the entries of τi = θi − θ0 are ranked by ascending |τi| (equal
    magnitudes by position), and rank r of n gets density − ε + 2ε·r/(n − 1): the smallest
    magnitude density − ε, the largest density + ε (mergekit's `della_magprune`, which ranks
    along dim 1 of a tensor and treats a 1-D tensor as one row; a row of one element, where
    mergekit fails, gets density). density >= 1 keeps every entry: chance 1.
    """
    if row_length < 1 or models.shape[1] % row_length:
        raise ValueError(f"{models.shape[1]} elements are not whole rows of {row_length}")
    density = np.asarray(density, np.float64)
    epsilon = np.asarray(epsilon, np.float64)
    pruned = density < 1
    lowest = np.where(pruned, density - epsilon, 1.0)
    spread = np.where(pruned, 2 * epsilon, 0.0)
    out = np.empty(models.shape, np.float32)
    ranked_chances_(out, kernel_array(models), base, row_length, lowest, spread)
    return out


def merge_task_vectors(
    models: np.ndarray,
    base: np.ndarray | None,
    weights: np.ndarray,
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    keys: list[int] | None = None,
    density: np.ndarray | None = None,
    chances: np.ndarray | None = None,
    rescale_by_chance: bool = False,
    start: int = 0,
    storage: type = np.float32,
) -> np.ndarray:
    """θ0 + λ·merge of the weighted, sparsified task vectors τi = θi − θ0 of models [N, C]
    (float32 or bfloat16 bit patterns; the base too). With no base, only the plain weighted
    sum: λ·Σi wi·θi (divided as `normalize` says), each term added in one rounding (a fused
    multiply-add, as torch's addcmul_ in mergekit's linear merge).

    Sparsify: with `low`/`high`, keep low[i] <= |τi| <= high[i] (magnitude trim, Breadcrumbs
    band); with `keys`/`density`, DARE: keep each entry with probability density[i], using
    element start + j of stream keys[i]; with `keys`/`chances` ([N, C] float32), DELLA: keep
    entry j of model i with probability chances[i, j] from the same streams, divided by it when
    `rescale_by_chance`; otherwise keep all. Kept entries are multiplied by scale[i] (default
    1), then by the weight wi (weights apply before any election).
    Merge: `consensus` is the TIES election (γ = + where Σ wi·τi >= 0) and disjoint merge;
    `normalize` divides by the agreeing models' summed weights (0 divides as 1). Otherwise the
    weighted sum; `normalize` divides by Σ wi (|Σ wi| < 1e-8 divides as 1).
    The result is a new array of `storage`: float32, or np.uint16 for bfloat16 bit patterns
    rounded as `from_float32` rounds, in the same pass (no float32 result to narrow after).
    Raises NonFiniteInput when an input holds NaN or Inf, NonFiniteOutput when a merged value
    does. The models are left unchanged.
    """
    n = models.shape[0]
    mode, no_limits = K.MODE_NONE, np.zeros(n, np.float32)
    if base is None and (
        consensus or low is not None or keys is not None or chances is not None or scale is not None
    ):
        raise ValueError("only a plain weighted sum merges without a base")
    if low is not None:
        mode = K.MODE_BAND
    elif chances is not None:
        mode = K.MODE_RANKED_RESCALED if rescale_by_chance else K.MODE_RANKED
    elif keys is not None:
        mode = K.MODE_RANDOM
    total = float(ordered_sum(np.asarray(weights, dtype=np.float32)))
    divisor = np.float32(total if normalize and abs(total) >= 1e-8 else 1.0)
    out = np.empty(models.shape[1:], storage)
    non_finite, non_finite_out = K.merge_task_vectors(
        kernel_array(models), _NO_BASE if base is None else base, mode,
        _f32(low, no_limits), _f32(high, no_limits), _f32(scale, np.ones(n, np.float32)),
        np.array(keys or [0] * n, dtype=np.uint64),
        np.asarray(density if density is not None else no_limits, dtype=np.float64),
        np.ascontiguousarray(chances, np.float32) if chances is not None else np.empty((n, 0), np.float32),
        start, _f32(weights, no_limits), consensus, normalize, divisor, np.float32(lam), out,
    )  # fmt: skip
    refuse_non_finite(non_finite, non_finite_out)
    return out


def refuse_non_finite(non_finite: int, non_finite_out: int) -> None:
    """Raise for a kernel's counts of NaN/Inf task-vector entries and merged values (the
    engine then names the input, or the parameters, that caused them)."""
    if non_finite:
        raise NonFiniteInput(f"{non_finite} NaN/Inf value(s) in the task vectors")
    if non_finite_out:
        raise NonFiniteOutput(f"{non_finite_out} merged value(s) overflow to Inf/NaN")


_NO_BASE = np.empty(0, np.float32)


def _f32(values: np.ndarray | None, default: np.ndarray) -> np.ndarray:
    return default if values is None else np.ascontiguousarray(values, dtype=np.float32)
