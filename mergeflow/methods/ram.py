"""RAM, Reinforced Agent Merging (arXiv 2601.13572), and its tensor-local RAM+, as mergekit
writes them (`ram`, `ramplus_tl`).

Per entry, with base θ0, task vectors τi = θi − θ0, and c = #{i : |τi| > ε} the models that
change it:
  - an entry only one model changes keeps that model's change whole (RAM+: scaled by λi);
  - an entry several models change gets their mean change, Σ τi / c over those c models;
  - changes of at most ε count as none.
RAM+ scales each model's unique entries by λi = 1 + r·clamp(ρi, 0, α), with ρi the ratio of the
entries model i shares with others to those it alone changes, counted over the whole tensor:
models whose changes mostly overlap others' get their few unique ones boosted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit, prange

from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param, TensorChunks
from mergeflow.methods.kernels import BLOCK, stored, widen

EPSILON = Param(
    "epsilon",
    1e-5,
    "a task-vector entry counts as changed when |τ| exceeds it",
    check=lambda x: math.isfinite(x) and x >= 0,
    check_message="must be a finite number >= 0",
)


def _merge(chunk: Chunk) -> np.ndarray:
    unique_scales = chunk.stats if chunk.stats is not None else np.ones(len(chunk.models), np.float32)
    out = np.empty(chunk.models.shape[1], chunk.storage)
    non_finite, non_finite_out = merge_(
        out, P.kernel_array(chunk.models), chunk.base, np.float32(chunk.params["epsilon"]), unique_scales
    )
    P.refuse_non_finite(non_finite, non_finite_out)
    return out


def _unique_scales(tensor: TensorChunks, params: Mapping[str, Any]) -> np.ndarray:
    """RAM+'s λi = 1 + r·clamp(ρi, 0, α), ρi = shared_i / max(unique_i, ε), from exact counts
    over the whole tensor (float64, then float32); ρi = 0 for a model sharing no entry."""
    epsilon = float(params["epsilon"])
    unique = np.zeros(tensor.n_models, np.int64)
    shared = np.zeros(tensor.n_models, np.int64)
    for _, base, models in tensor.chunks():
        unique_by_block, shared_by_block = overlap_counts_(P.kernel_array(models), base, np.float32(epsilon))
        unique += unique_by_block.sum(axis=0)
        shared += shared_by_block.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(shared > 0, shared / np.maximum(unique, epsilon), 0.0)
    clamped = np.minimum(np.maximum(rho, 0.0), float(params["alpha"]))  # torch.clamp's order
    return (1.0 + float(params["r"]) * clamped).astype(np.float32)


NOTES = (
    "An entry is changed where |τ| > epsilon, compared in float32.",
    "Several models' changes are averaged as Σ τi / c, in model order.",
)

RAM = MergeMethod(
    name="ram",
    summary="Keep changes only one model makes whole; average the changes several models make.",
    formula="θ = θ0 + Σi τi·[|τi| > ε] / max(c, 1),  c = Σi [|τi| > ε]",
    merge=_merge,
    params=(EPSILON,),
    reads_bfloat16=True,
    writes_storage=True,
    notes=NOTES,
)

RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    summary="RAM, scaling up a model's unique changes the more of its changes overlap others'.",
    formula="θ = θ0 + Σi τi·[|τi| > ε]·(λi if c = 1 else 1/c),  λi = 1 + r·clamp(shared_i / unique_i, 0, α)",
    params=(
        Param("r", 0.1, "how strongly overlap scales a model's unique changes"),
        Param("alpha", 0.2, "upper bound on the overlap ratio that scales them"),
        EPSILON,
    ),
    merge=_merge,
    chunk_statistic=_unique_scales,
    reads_bfloat16=True,
    writes_storage=True,
    notes=NOTES,
)


# --- kernels (see kernels.py for how they read bfloat16 and write the output's storage) ---


@njit(parallel=True, cache=True)
def merge_(out, models, base, epsilon, unique_scales):
    """out = θ0 + Σi τi·[|τi| > ε]·(si if c = 1 else 1/c) with c = Σi [|τi| > ε], τi = models[i]
    − base, summed in model order; stored as `out` stores it. Returns how many task-vector
    entries and how many merged values are NaN or ±Inf."""
    n_models, count = models.shape
    non_finite = non_finite_out = 0
    for block in prange((count + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        size = min(count, lo + BLOCK) - lo
        block_base, block_out = base[lo : lo + size], out[lo : lo + size]
        changed_by = np.zeros(size, np.int32)
        bad = bad_out = 0
        for i in range(n_models):
            model = models[i, lo : lo + size]
            for j in range(size):
                tau = widen(model[j]) - widen(block_base[j])
                bad += tau - tau != 0  # true exactly for NaN and ±Inf
                changed_by[j] += abs(tau) > epsilon
        total = np.zeros(size, np.float32)
        for i in range(n_models):
            model, scale = models[i, lo : lo + size], unique_scales[i]
            for j in range(size):
                tau = widen(model[j]) - widen(block_base[j])
                if abs(tau) > epsilon:
                    total[j] += tau * scale if changed_by[j] == 1 else tau / np.float32(changed_by[j])
        for j in range(size):
            value = widen(block_base[j]) + total[j]
            bad_out += value - value != 0
            block_out[j] = stored(value, block_out)
        non_finite += bad
        non_finite_out += bad_out
    return non_finite, non_finite_out


@njit(parallel=True, cache=True)
def overlap_counts_(models, base, epsilon):
    """Per block of entries and per model, how many entries the model alone changes (|τ| > ε)
    and how many it changes with others: two [blocks, N] int64 arrays."""
    n_models, count = models.shape
    n_blocks = (count + BLOCK - 1) // BLOCK
    unique = np.zeros((n_blocks, n_models), np.int64)
    shared = np.zeros((n_blocks, n_models), np.int64)
    for block in prange(n_blocks):
        lo = block * BLOCK
        size = min(count, lo + BLOCK) - lo
        block_base = base[lo : lo + size]
        changed = np.empty((n_models, size), np.uint8)
        changed_by = np.zeros(size, np.int32)
        for i in range(n_models):
            model = models[i, lo : lo + size]
            for j in range(size):
                flag = np.uint8(abs(widen(model[j]) - widen(block_base[j])) > epsilon)
                changed[i, j] = flag
                changed_by[j] += flag
        for i in range(n_models):
            alone = together = 0
            for j in range(size):
                flag = changed[i, j]
                alone += flag & (changed_by[j] == 1)
                together += flag & (changed_by[j] > 1)
            unique[block, i] = alone
            shared[block, i] = together
    return unique, shared
