"""mergekit's NuSLERP: spherical interpolation between two models (their task vectors when a
base is given), with the interpolation factor from their weights, over the whole tensor or
per row or column.

t = w1 / (w0 + w1) (0.5 when |w0 + w1| < 1e-6). For each vector pair (v0, v1), the two
task vectors (or models) over the whole tensor (`nuslerp_flatten`, the default), each row
(the last dimension), or with `nuslerp_row_wise` each vector along the first dimension:
cos Ω = ⟨v0, v1⟩ / (max(‖v0‖, 1e-7)·max(‖v1‖, 1e-7)), and
v = (sin((1−t)Ω)·v0 + sin(tΩ)·v1) / sin Ω, or (1−t)·v0 + t·v1 where 1 − cos²Ω <= 1e-16;
θ = θ0 + v (v alone without a base). Inner products are float64, summed in element order per
row or column, so the result does not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param, TensorChunks
from mergeflow.methods.kernels import widen
from mergeflow.methods.linear import combine


@dataclass(frozen=True)
class Coefficients:
    """v = a·v0 + b·v1: scalars for the whole tensor, or [stride] arrays for the vectors along
    the first dimension (element e belongs to vector e mod stride)."""

    a: Any
    b: Any
    stride: int = 0


def interpolation_factor(weights: np.ndarray) -> float:
    total = float(weights[0]) + float(weights[1])
    return 0.5 if abs(total) < 1e-6 else float(weights[1]) / total


def nuslerp_coefficients(squares0, squares1, products, t: float):
    """(a, b) from ‖v0‖², ‖v1‖² and ⟨v0, v1⟩ (numbers or arrays, float64), as mergekit
    computes them."""
    n0 = np.maximum(np.sqrt(np.maximum(squares0, 0)), 1e-7)
    n1 = np.maximum(np.sqrt(np.maximum(squares1, 0)), 1e-7)
    cos = np.clip(products / (n0 * n1), -1.0, 1.0)
    colinear = (1 - cos * cos) <= 1e-16
    angle = np.arccos(np.where(colinear, 0.0, cos))
    sin = np.where(colinear, 1.0, np.sin(angle))
    a = np.where(colinear, 1 - t, np.sin((1 - t) * angle) / sin)
    b = np.where(colinear, t, np.sin(t * angle) / sin)
    return a, b


def _statistic(tensor: TensorChunks, params: Mapping[str, Any]) -> Coefficients | None:
    t = interpolation_factor(params["weight"])
    whole = params["nuslerp_flatten"] or len(tensor.shape) < 2
    if whole:
        gram = P.gram(tensor, from_base=tensor.has_base)
        a, b = nuslerp_coefficients(gram[0, 0], gram[1, 1], gram[0, 1], t)
        return Coefficients(float(a), float(b))
    if not params["nuslerp_row_wise"]:
        return None  # per row: each chunk holds whole rows, merged as they come
    stride = tensor.numel // tensor.shape[0]
    sums = np.zeros((3, stride), np.float64)
    for start, base, models in tensor.chunks():
        column_products_(sums, P.kernel_array(models), *_base_arg(base), start, stride)
    a, b = nuslerp_coefficients(sums[0], sums[1], sums[2], t)
    return Coefficients(a.astype(np.float32), b.astype(np.float32), stride)


def _base_arg(base: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """The kernels' (base, has_base): an empty array stands for no base."""
    return (np.zeros(0, np.float32), False) if base is None else (base, True)


def _merge(chunk: Chunk) -> np.ndarray:
    coefficients: Coefficients | None = chunk.stats
    base, models = chunk.base, P.kernel_array(chunk.models)
    if coefficients is not None and not coefficients.stride:  # one (a, b) for the tensor
        return combine(models, base, [coefficients.a, coefficients.b])
    count = models.shape[1]
    if coefficients is None:  # per row: coefficient k for the chunk's row k
        sums = np.empty((3, count // chunk.row_length), np.float64)
        row_products_(sums, models, *_base_arg(base), chunk.row_length)
        a, b = nuslerp_coefficients(sums[0], sums[1], sums[2], interpolation_factor(chunk.params["weight"]))
        offset, divisor, modulus = 0, chunk.row_length, len(a)
    else:  # per vector along dim 0: coefficient (start + j) mod stride
        a, b = coefficients.a, coefficients.b
        offset, divisor, modulus = chunk.start, 1, coefficients.stride
    out = np.empty(count, np.float32)
    a, b = a.astype(np.float32), b.astype(np.float32)
    interpolate_(out, models, *_base_arg(base), a, b, offset, divisor, modulus)
    return out


NUSLERP = MergeMethod(
    name="nuslerp",
    summary="Spherical interpolation of two models' task vectors, t from their weights.",
    formula="θ = θ0 + sin((1−t)Ω)/sin Ω·τ0 + sin(tΩ)/sin Ω·τ1,  t = w1/(w0+w1)  (τi = θi without a base)",
    merge=_merge,
    params=(
        Param("weight", 1.0, "weight of this model: t = w1 / (w0 + w1)", per_model=True),
        Param("nuslerp_flatten", True, "one angle for the whole tensor", kind=bool),
        Param("nuslerp_row_wise", False, "without flatten: one angle per vector along dim 0", kind=bool),
    ),
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
    chunk_statistic=_statistic,
    reads_bfloat16=True,
    whole_rows=True,
)


@njit(cache=True, inline="always")
def _pair(models, base, has_base, j):
    """The two task vectors' (or models') element j, in float32."""
    v0, v1 = widen(models[0, j]), widen(models[1, j])
    if has_base:
        b = widen(base[j])
        v0, v1 = v0 - b, v1 - b
    return v0, v1


@njit(parallel=True, cache=True)
def row_products_(sums, models, base, has_base, row_length):
    """sums[:, r] = ‖v0‖², ‖v1‖², ⟨v0, v1⟩ over row r, in float64 and element order."""
    for r in prange(models.shape[1] // row_length):
        s0 = s1 = s01 = 0.0
        for j in range(r * row_length, (r + 1) * row_length):
            x, y = _pair(models, base, has_base, j)
            x, y = np.float64(x), np.float64(y)
            s0 += x * x
            s1 += y * y
            s01 += x * y
        sums[0, r], sums[1, r], sums[2, r] = s0, s1, s01


COLUMN_BLOCK = 64  # vectors along dim 0 summed together, a row's cache lines at a time


@njit(parallel=True, cache=True)
def column_products_(sums, models, base, has_base, start, stride):
    """sums[:, c] += the squares and products of the chunk's elements of vector c (element e of
    the tensor belongs to vector e mod stride), each vector's in element order. A chunk of whole
    rows of `stride` elements (a 2-D tensor) is summed in parallel by blocks of vectors; others
    one element at a time. Either way each vector adds its elements in the same order."""
    count = models.shape[1]
    if start % stride == 0 and count % stride == 0:
        for block in prange((stride + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
            lo = block * COLUMN_BLOCK
            for r in range(count // stride):
                for c in range(lo, min(stride, lo + COLUMN_BLOCK)):
                    x, y = _pair(models, base, has_base, r * stride + c)
                    x, y = np.float64(x), np.float64(y)
                    sums[0, c] += x * x
                    sums[1, c] += y * y
                    sums[2, c] += x * y
        return
    for j in range(count):
        c = (start + j) % stride
        x, y = _pair(models, base, has_base, j)
        x, y = np.float64(x), np.float64(y)
        sums[0, c] += x * x
        sums[1, c] += y * y
        sums[2, c] += x * y


@njit(parallel=True, cache=True)
def interpolate_(out, models, base, has_base, a, b, offset, divisor, modulus):
    """out[j] = a[k]·v0 + b[k]·v1 (+ the base), k = ((offset + j) // divisor) mod modulus."""
    for j in prange(out.size):
        k = ((offset + j) // divisor) % modulus
        v0, v1 = _pair(models, base, has_base, j)
        value = v0 * a[k] + v1 * b[k]
        out[j] = value + widen(base[j]) if has_base else value
