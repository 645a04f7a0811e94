"""Fused loops for the merge hot paths, compiled with numba.

An array library runs one pass over memory per operation; TIES on a chunk is a dozen of them. These
kernels do the same arithmetic in one or two passes. Each output element is computed by one
thread, summing over models in model order, so results do not depend on chunking or on the
number of threads. Inputs are numpy arrays: float32, or bfloat16 as its uint16 bit patterns,
which `widen` turns into float32 as it reads them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

BLOCK = 4096  # elements per cache-resident block in the combine kernels
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO_POW_24 = 16777216.0

MODE_NONE, MODE_BAND, MODE_RANDOM, MODE_RANKED, MODE_RANKED_RESCALED = 0, 1, 2, 3, 4


def default_threads() -> int:
    """Threads for a merge that names none: as many as torch uses where the caller loaded
    torch (a caller that limits torch, such as a one-thread Dask worker, limits the kernels
    too), else one per core."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else numba.config.NUMBA_NUM_THREADS


def use_threads(count: int) -> None:
    """Run the kernels on `count` threads, and keep torch's own parallel operations at `count`
    in a process that loaded torch (the engine does not need it).

    numba's OpenMP pool shares the OpenMP runtime torch uses; when the pool starts (on the first
    parallel kernel of a process) it raises the runtime's thread count, and torch's element-wise
    and attention operations (not its matrix products) then use every core. In a one-thread Dask
    worker that doubled the threads on the machine. Starting the pool first and setting torch's
    count after keeps both at `count`."""
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))


def load_cached_kernels_without_compiler_setup(on_compile: Callable[[], None] | None = None) -> None:
    """Make numba load cached kernels without first setting its compiler up; for a process
    that runs no numba code but mergeflow's kernels (the `mergeflow merge` command). A kernel
    not in the cache calls `on_compile` before numba compiles it.

    Before it loads each cached function, numba refreshes its compiler: it imports every typing
    and lowering registry it has (its numpy support with scipy.linalg, cffi, typed containers,
    random generators...), although running compiled code needs only numba's runtime (NRT).
    After this, a cache hit starts the runtime alone: a fresh process's first two kernels took
    0.05 s instead of 0.23-0.27 s, a merge of two 2.8M-parameter experts 0.44 instead of 0.50 s
    (side by side). A miss compiles as before: numba's compiler refreshes the registries
    itself. A numba whose cache lacks the methods used here keeps its own behaviour."""
    from numba.core.caching import Cache
    from numba.core.runtime import nrt

    def load_overload(cache, signature, target_context):
        nrt.rtsys.initialize(target_context)
        overload = None
        with cache._guard_against_spurious_io_errors():
            overload = cache._load_overload(signature, target_context)
        if overload is None and on_compile is not None:
            on_compile()
        return overload

    if all(hasattr(Cache, name) for name in ("_load_overload", "_guard_against_spurious_io_errors")):
        Cache.load_overload = load_overload


@njit(cache=True, inline="always")
def splitmix64(z):
    """SplitMix64's output function: a well-mixed 64-bit hash of a 64-bit counter."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def uniform24(key, index):
    """A uniform number k / 2^24 for element `index` of the stream `key` (counter-based)."""
    counter = key + (np.uint64(index) + np.uint64(1)) * _GOLDEN
    return float(splitmix64(counter) >> np.uint64(40)) / _TWO_POW_24


@njit(cache=True, inline="always")
def _weighted_task_vector(model, base, mode, low, high, scale, weight, key, density, first, row, chance):
    """row[j] = wi · sparsify(τi) for one block of model i (`model`, `base`, `chance`: that
    block, `first`: its first element's index in the tensor); returns how many τ entries are NaN
    or ±Inf. One loop per mode, so each compiles to a tight loop."""
    bad = 0
    count = row.size
    if mode == MODE_BAND:
        for j in range(count):
            tau = widen(model[j]) - widen(base[j])
            bad += tau - tau != 0  # true exactly for NaN and ±Inf
            magnitude = abs(tau)
            kept = (low <= magnitude) & (magnitude <= high)
            row[j] = (tau * scale) * weight if kept else np.float32(0.0)
    elif mode == MODE_RANDOM:
        for j in range(count):
            tau = widen(model[j]) - widen(base[j])
            bad += tau - tau != 0
            kept = uniform24(key, first + j) < density
            row[j] = (tau * scale) * weight if kept else np.float32(0.0)
    elif mode in (MODE_RANKED, MODE_RANKED_RESCALED):
        rescaled = mode == MODE_RANKED_RESCALED  # loop-invariant: LLVM compiles a loop for each
        for j in range(count):
            tau = widen(model[j]) - widen(base[j])
            bad += tau - tau != 0
            kept = uniform24(key, first + j) < chance[j]
            factor = scale / chance[j] if rescaled else scale
            row[j] = (tau * factor) * weight if kept else np.float32(0.0)
    else:
        for j in range(count):
            tau = widen(model[j]) - widen(base[j])
            bad += tau - tau != 0
            row[j] = (tau * scale) * weight
    return bad


@njit(cache=True, fastmath={"contract"})
def _add_weighted(model, weight, total):
    """total[j] += weight · model[j], each in one rounding: a fused multiply-add where the CPU has
    one, as torch's addcmul_ in mergekit's linear merge (two roundings differed from it by an ulp
    in up to a third of the entries). Returns how many entries of the model are NaN or ±Inf."""
    bad = 0
    for j in range(total.size):
        x = widen(model[j])
        bad += x - x != 0
        total[j] += x * weight
    return bad


@njit(parallel=True, cache=True)
def merge_task_vectors(
    models, base, mode, low, high, scale, keys, density, chances, start,
    weights, consensus, normalize, divisor, lam, out,
):  # fmt: skip
    """out = base + λ·combine(wi · sparsify(models[i] − base)), in one pass over the models,
    stored as `out` stores it (float32, or bfloat16 bit patterns: see `stored`). Returns how many
    task-vector entries (a NaN or Inf in any input) and how many merged values are NaN or ±Inf.

    sparsify: mode NONE keeps every entry; BAND keeps low[i] <= |τ| <= high[i]; RANDOM keeps
    an entry when its uniform number (stream keys[i], element start + j) is below density[i];
    RANKED and RANKED_RESCALED when it is below the entry's own chances[i, j] ([N, count]; an
    [N, 0] array in the other modes), RANKED_RESCALED dividing the kept entry by that chance.
    Kept entries are multiplied by scale[i], then by the weight wi.
    combine: with `consensus`, the TIES sign election and disjoint merge: the elected sign is +
    where Σi wi·τi >= 0, an entry agrees when it is non-zero with that sign, and the sum of the
    agreeing entries is divided by their summed weights when `normalize` (0 divides as 1).
    Otherwise the plain sum, divided by `divisor`. An empty `base` (mode NONE, no consensus)
    stands for none: out = λ·Σi wi·models[i] / divisor (scale all 1), reading no base at all (a
    float32 zero base made a 2-model average's kernel 25-35% slower), each term added to the
    sum with one rounding (`_add_weighted`).

    Work goes block by block: a block's weighted task vectors stay in cache between the
    sparsify, vote and sum steps instead of going back to memory after each. Loops index
    slices of the block from 0: numba cannot prove `lo + j` non-negative, and its
    negative-index wraparound would keep LLVM from vectorising them.
    """
    n_models, count = models.shape
    non_finite = 0
    non_finite_out = 0
    for block in prange((count + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        size = min(count, lo + BLOCK) - lo
        block_base, block_out = base[lo : lo + size], out[lo : lo + size]
        rows = np.empty((n_models if consensus else 1, size), np.float32)
        total = np.zeros(size, np.float32)
        bad = bad_out = 0
        for i in range(n_models):
            if block_base.size == 0:  # the models' own weighted sum (scale is 1: see the docstring)
                bad += _add_weighted(models[i, lo : lo + size], weights[i], total)
                continue
            row = rows[i if consensus else 0]
            bad += _weighted_task_vector(
                models[i, lo : lo + size], block_base, mode, low[i], high[i], scale[i], weights[i], keys[i],
                density[i], start + lo, row, chances[i, lo : lo + size],
            )  # fmt: skip
            for j in range(size):
                total[j] += row[j]
        if consensus:
            vote = total
            total = np.zeros(size, np.float32)
            agreeing = np.zeros(size, np.float32)
            for i in range(n_models):
                w = weights[i]
                for j in range(size):
                    x = rows[i, j]
                    agrees = (x > 0) if vote[j] >= 0 else (x < 0)
                    total[j] += x if agrees else np.float32(0.0)
                    agreeing[j] += w if agrees else np.float32(0.0)
            for j in range(size):
                merged = total[j]
                if normalize and agreeing[j] != 0:
                    merged = merged / agreeing[j]
                value = widen(block_base[j]) + merged * lam
                bad_out += value - value != 0
                block_out[j] = stored(value, block_out)
        elif block_base.size == 0:
            for j in range(size):
                value = (total[j] / divisor) * lam
                bad_out += value - value != 0
                block_out[j] = stored(value, block_out)
        else:
            for j in range(size):
                value = widen(block_base[j]) + (total[j] / divisor) * lam
                bad_out += value - value != 0
                block_out[j] = stored(value, block_out)
        non_finite += bad
        non_finite_out += bad_out
    return non_finite, non_finite_out


def widen(x):
    """x as float32. numba kernels see bfloat16 tensors as their uint16 bit patterns (numpy
    has no bfloat16): a bfloat16 is the top half of the float32 of the same value."""
    raise NotImplementedError("widen is only defined inside numba kernels")


@overload(widen, inline="always")
def _widen(x):
    if x == types.uint16:
        return lambda x: np.int32(np.int64(x) << 16).view(np.float32)
    return lambda x: np.float32(x)


@njit(parallel=True, cache=True)
def widen_(out, src):
    """out = float32 of bfloat16 bit patterns `src`."""
    for j in prange(src.size):
        out[j] = widen(src[j])


def stored(x, out):
    """float32 `x` as an element of `out`: itself in a float32 array; in a uint16 array the
    bit pattern of the bfloat16 nearest to it, ties to even, as torch rounds (NaN becomes
    0x7FC0), so a merge kernel writes bfloat16 output without a float32 pass between."""
    raise NotImplementedError("stored is only defined inside numba kernels")


@overload(stored)
def _stored(x, out):
    if out.dtype == types.uint16:

        def to_bfloat16(x, out):
            bits = np.int64(np.float32(x).view(np.uint32))
            rounded = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
            return np.uint16(0x7FC0) if x != x else np.uint16(rounded)

        return to_bfloat16
    return lambda x, out: np.float32(x)


@njit(parallel=True, cache=True)
def narrow_to_bfloat16_(out, src):
    """out = bfloat16 bit patterns of float32 `src` (see `stored`). Returns how many of `src`
    are NaN or ±Inf."""
    bad = 0
    for j in prange(src.size):
        x = src[j]
        bad += x - x != 0  # true exactly for NaN and ±Inf
        out[j] = stored(x, out)
    return bad


@njit(parallel=True, cache=True)
def copy_float32_(out, src):
    """out = src; returns how many of `src` are NaN or ±Inf."""
    bad = 0
    for j in prange(src.size):
        x = src[j]
        bad += x - x != 0
        out[j] = x
    return bad


@njit(parallel=True, cache=True)
def copy_bfloat16_(out, src):
    """out = src, bfloat16 bit patterns as they are; returns how many are NaN or ±Inf (every
    exponent bit set)."""
    bad = 0
    for j in prange(src.size):
        x = src[j]
        bad += (x & 0x7F80) == 0x7F80
        out[j] = x
    return bad
