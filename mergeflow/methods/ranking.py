"""DELLA's ranking kernel: the keep chance of every task-vector entry from its |τ| rank within
its row, compiled with numba (see kernels.py for how the kernels read their inputs)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mergeflow.methods.kernels import widen

RANK_TASKS = 64  # rows are ranked in this many interleaved groups, each reusing its buffers


@njit(parallel=True, cache=True)
def ranked_chances_(out, models, base, row_length, lowest, spread):
    """DELLA's keep chances: out[i, e] = lowest[i] + spread[i] · r / (n − 1), r being element
    e's rank, from 0, by ascending |τi| within its row of n = row_length elements (equal
    magnitudes ranked by position), computed in float64 and stored as float32. A row of one
    element gets lowest[i] + spread[i] / 2. Rows are ranked in parallel, each by a stable
    radix sort of its |τ| bit patterns (non-negative floats order like their bit patterns)
    packed above each entry's position: about 9× faster than numba's merge sort on rows of
    1024."""
    n_models, count = models.shape
    n_rows = count // row_length
    jobs = n_models * n_rows
    groups = min(RANK_TASKS, jobs)
    chance_of_rank = np.empty((n_models, row_length), np.float32)
    for i in range(n_models):
        for rank in range(row_length):
            ratio = rank / (row_length - 1) if row_length > 1 else 0.5
            chance_of_rank[i, rank] = np.float32(lowest[i] + spread[i] * ratio)
    for group in prange(groups):
        packed, spare = np.empty(row_length, np.uint64), np.empty(row_length, np.uint64)
        counts = np.empty((4, 256), np.int64)
        for job in range(group, jobs, groups):
            i = job // n_rows
            first = (job - i * n_rows) * row_length
            row_model, row_base = models[i, first : first + row_length], base[first : first + row_length]
            row_out, chances = out[i, first : first + row_length], chance_of_rank[i]
            counts[:] = 0
            for j in range(row_length):
                key = np.float32(abs(widen(row_model[j]) - widen(row_base[j]))).view(np.uint32)
                packed[j] = (np.uint64(key) << np.uint64(32)) | np.uint64(j)
                counts[0, key & 255] += 1
                counts[1, (key >> 8) & 255] += 1
                counts[2, (key >> 16) & 255] += 1
                counts[3, key >> 24] += 1
            ranked = _radix_sort(packed, spare, counts)
            for rank in range(row_length):
                row_out[ranked[rank] & np.uint64(0xFFFFFFFF)] = chances[rank]


@njit(cache=True)
def _radix_sort(packed, spare, counts):
    """`packed` (a 32-bit key above a 32-bit position) sorted by key, stably (least
    significant key byte first), given counts[b, d]: how many keys have byte b equal to d
    (counted as the keys were made: a permutation does not change them). Both arrays are
    scratch; the sorted one is returned. A byte all keys share is not moved on."""
    n = packed.size
    for byte in range(4):
        shift = np.uint64(32 + 8 * byte)
        offsets = counts[byte]
        if offsets.max() == n:
            continue
        total = 0
        for digit in range(256):
            size = offsets[digit]
            offsets[digit] = total
            total += size
        for j in range(n):
            value = packed[j]
            digit = (value >> shift) & np.uint64(255)
            position = offsets[digit]
            spare[position] = value
            offsets[digit] = position + 1
        packed, spare = spare, packed
    return packed
