"""numba kernels of whole-tensor statistics: |τ| and the histograms of its bit patterns that
pin down an exact order statistic (the TIES and Breadcrumbs thresholds), Gram matrices of
row vectors (model_stock, nuslerp), and sums of rows in a fixed order. As in kernels.py, each
result is the same for any chunking or number of threads."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mergeflow.methods.kernels import widen


@njit(cache=True, inline="always")
def _magnitude(model, base, has_base, j):
    """|τ| at element j: |model − base|, or |model| when the model already is a task vector."""
    d = widen(model[j])
    if has_base:
        d = d - widen(base[j])
    return np.float32(abs(d))


@njit(parallel=True, cache=True)
def magnitudes_(out, model, base, has_base):
    """out = |τ| of every element (see _magnitude)."""
    for j in prange(out.size):
        out[j] = _magnitude(model, base, has_base, j)


HISTOGRAM_BLOCK = 2048  # |τ| bit patterns computed at once, vectorised, then counted
MATCH_GROUP = 64  # second scan: a group is counted one by one only when it holds a match


@njit(parallel=True, cache=True)
def magnitude_histogram(model, base, has_base, high, n_parts):
    """How many |τ| there are of each top 16 bits of their float32 bit pattern (high < 0; 2^15
    bins, the sign bit of |τ| being 0); or, among those whose top 16 bits equal `high`, of each
    bottom 16 bits (2^16 bins). Non-negative floats order like their bit patterns, so two
    histograms pin down an exact order statistic. NaN sorts above +Inf. Counted in `n_parts`
    slices in parallel, a block at a time. The second scan's bin holds a small share of the
    entries: each group of MATCH_GROUP entries is first tested at once, and most hold none.

    Loops run over slices from index 0: numba cannot prove an index from `range(start, end)`
    non-negative, and its negative-index wraparound keeps LLVM from vectorising the loop."""
    n = model.size
    step = (n + n_parts - 1) // n_parts
    counts = np.zeros((n_parts, 1 << 15 if high < 0 else 1 << 16), np.int64)
    for part in prange(n_parts):
        block = np.empty(HISTOGRAM_BLOCK, np.int32)
        end = min(n, (part + 1) * step)
        for lo in range(part * step, end, HISTOGRAM_BLOCK):
            size = min(HISTOGRAM_BLOCK, end - lo)
            block_model, block_base = model[lo : lo + size], base[lo : lo + size]  # base may be empty
            for j in range(size):
                block[j] = _magnitude(block_model, block_base, has_base, j).view(np.int32)
            if high < 0:
                for j in range(size):
                    counts[part, (block[j] >> 16) & 0x7FFF] += 1
                continue
            for first in range(0, size, MATCH_GROUP):
                group = block[first : min(size, first + MATCH_GROUP)]
                matches = 0
                for j in range(group.size):
                    matches += (group[j] >> 16) == high
                if matches:
                    for j in range(group.size):
                        if group[j] >> 16 == high:
                            counts[part, group[j] & 0xFFFF] += 1
    return counts.sum(axis=0)


@njit(cache=True)
def bin_from_the_top(counts, k):
    """(the bin holding the k-th largest entry, how many entries lie in higher bins)."""
    above = 0
    for b in range(counts.size - 1, -1, -1):
        if above + counts[b] >= k:
            return b, above
        above += counts[b]
    return 0, above


GRAM_LANES = 8  # partial sums per inner product, each over every 8th element of the row


@njit(parallel=True, cache=True)
def gram_rows_(out, models, base, from_base, base_first, row_length):
    """out[r] = the Gram matrix of row r's vectors (float64): the models, minus the base when
    `from_base`, preceded by the base itself when `base_first`. Each inner product sums in
    GRAM_LANES fixed lanes, then the lanes in order: the same for any chunking (rows are never
    split) or thread count, and the lanes vectorise."""
    n_models, count = models.shape
    first = 1 if base_first else 0
    n = n_models + first
    for r in prange(count // row_length):
        lo = r * row_length
        vectors = np.empty((n, row_length), np.float64)
        for i in range(n):
            for j in range(row_length):
                if base_first and i == 0:
                    vectors[i, j] = widen(base[lo + j])
                elif from_base:
                    vectors[i, j] = widen(models[i - first, lo + j]) - widen(base[lo + j])
                else:
                    vectors[i, j] = widen(models[i - first, lo + j])
        whole = row_length - row_length % GRAM_LANES
        for i in range(n):
            for k in range(i + 1):
                lanes = np.zeros(GRAM_LANES, np.float64)
                for j in range(0, whole, GRAM_LANES):
                    for lane in range(GRAM_LANES):
                        lanes[lane] += vectors[i, j + lane] * vectors[k, j + lane]
                for j in range(whole, row_length):
                    lanes[j - whole] += vectors[i, j] * vectors[k, j]
                total = 0.0
                for lane in range(GRAM_LANES):
                    total += lanes[lane]
                out[r, i, k] = out[r, k, i] = total


@njit(cache=True)
def add_rows_in_order_(total, rows):
    """total += rows[0], rows[1], ... one at a time, in order."""
    for r in range(rows.shape[0]):
        total += rows[r]
