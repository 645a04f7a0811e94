"""What a merge method is: parameters it accepts, optional whole-tensor statistics, and a
pure function that merges one chunk of one tensor."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Param:
    """One method parameter. `per_model` parameters may differ between models."""

    name: str
    default: float | bool | None  # None: required
    description: str
    per_model: bool = False
    kind: type = float
    check: Callable[[float], bool] = math.isfinite
    check_message: str = "must be a finite number"


@dataclass
class Chunk:
    """Everything a method sees for elements [start, start + numel) of one tensor.

    `models` is [N, numel] float32, or bfloat16 bit patterns (uint16) as stored for a method
    that `reads_bfloat16`, and owned by the method (it may be modified in place);
    `base` is [numel] float32 or None, or for such a method bfloat16 as stored too. Shared
    parameters are floats/bools; per-model parameters are [N] float32 arrays. `stats` is
    whatever the method's statistic returned. `storage` is the element type a method that
    `writes_storage` returns: np.uint16 (bfloat16 bit patterns) or float32. For a method that
    needs `whole_rows`, the chunk holds whole rows of `row_length` elements.
    """

    tensor_name: str
    start: int
    base: np.ndarray | None
    models: np.ndarray
    params: Mapping[str, Any]
    stats: Any = None
    storage: type = np.float32
    row_length: int = 0


class TensorChunks(Protocol):
    """One tensor as a method's `chunk_statistic` sees it: passes over its chunks, every model
    at once. Chunks are as `Chunk` describes them (whole rows for a method that needs them)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    n_models: int
    has_base: bool
    row_length: int

    def chunks(self) -> Iterator[tuple[int, np.ndarray | None, np.ndarray]]:
        """(start, base, models [N, count]) for each chunk in order; each pass reads anew, and
        a chunk's arrays are reused once the next is asked for."""
        ...

    def scratch(self) -> np.ndarray:
        """A float32 buffer of `numel` elements, valid until the tensor is merged (a statistic
        the merge reads per chunk, such as SCE's variances)."""
        ...


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry. Exactly one of the statistic hooks may be set.

    - `model_statistic(magnitudes, params_i)`: from |τi| over one model's whole tensor (e.g. the
      TIES magnitude threshold), given as a `primitives.Magnitudes` that selects from |τi| in a
      couple of scans; computed one model at a time so memory does not grow with N.
    - `chunk_statistic(tensor, params)`: from passes over a `TensorChunks`, every model at once
      (model_stock's cosines and slerp's angle from a Gram matrix, SCE's variances and weights).
    """

    name: str
    summary: str
    formula: str
    merge: Callable[[Chunk], np.ndarray]
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    # Without `needs_base`: a base_model, when given, still takes part as the base (the origin
    # of task vectors, or for karcher one more point), so models that repeat it are not merged
    # again as models (mergekit's optional base). Otherwise (average) only the models listed are.
    optional_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    model_statistic: Callable[[Any, Mapping[str, float]], np.ndarray] | None = None
    chunk_statistic: Callable[[TensorChunks, Mapping[str, Any]], Any] | None = None
    # merge() takes bfloat16 models as they are stored: its kernels widen them as they read,
    # which saves a conversion pass over every chunk.
    reads_bfloat16: bool = False
    # Given a chunk's `storage`, merge() returns a new array of it (bfloat16 rounded in its
    # kernel, no float32 pass between) and raises NonFiniteOutput for NaN/Inf merged values;
    # without one, float32 values.
    writes_storage: bool = False
    # Each chunk holds whole rows (the last dimension; a 1-D tensor is one row): DELLA ranks
    # |τ| within rows; SCE sums squares by row, so its sums do not depend on the chunking.
    whole_rows: bool = False
    # Given one tensor's resolved parameters, (model index, what is wrong) for values that are
    # valid one by one but not together; the engine checks every tensor before merging.
    parameter_check: Callable[[Mapping[str, Any]], tuple[int, str] | None] | None = None
    notes: tuple[str, ...] = field(default=())

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def merges(self, n_models: int) -> bool:
        """Whether the method merges that many models besides the base."""
        return self.min_models <= n_models and (self.max_models is None or n_models <= self.max_models)
