"""A LoRA-adapted tensor, computed whenever the merge reads a range of it: W' = W + s·B·A
(mergeflow.lora says what an adapter changes, and how PEFT rounds), nothing written."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from mergeflow.errors import NonFiniteError
from mergeflow.lora import TensorUpdate
from mergeflow.methods.kernels import stored, widen
from mergeflow.methods.primitives import KERNEL_DTYPES, from_float32, to_float32
from mergeflow.safetensors_io import ComputedTensor, TensorEntry, TensorFileReader
from mergeflow.tensor_merge import row_length


@dataclass(frozen=True)
class AdaptedTensor(ComputedTensor):
    """A tensor of model `ref` with its adapter's update applied, computed whenever a range of
    it is read (TensorFileReader.read hands such reads here): nothing is written, and the
    product s·B·A is formed row block by row block, so memory stays at a few blocks however
    large the tensor, plus what ReadMemo keeps. Each entry of B·A is summed in the order of
    the rank index, with fused multiply-adds, the way torch's product forms it: the same bits
    whichever rows are read together, and the same as PEFT's merge_and_unload."""

    ref: str
    model: TensorEntry  # the model's own tensor
    update: TensorUpdate

    @property
    def shape(self) -> tuple[int, ...]:
        return self.model.shape

    def read(
        self, reader: TensorFileReader, start: int, count: int, into: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, start+count) of the adapted tensor in its storage dtype, as
        TensorFileReader.read gives a stored tensor's. NaN or Inf in a result is refused here,
        naming the model and tensor."""
        values = self.output(count, into)
        memo = ReadMemo.of(reader)
        kept = memo.get(self.name, self)
        if kept is not None:
            values[:] = kept[start : start + count]
            return values
        cols = max(1, row_length(self.shape))
        step = max(1, READ_BLOCK // cols) * cols  # whole rows per block
        position, end = start, start + count
        while position < end:
            stop = min(end, (position // step + 1) * step)
            self._block(reader, position, stop - position, cols, values[position - start : stop - start])
            position = stop
        if count == self.numel and memo.has_room(values.nbytes):
            memo.keep(self, values.copy())
        return values

    def _block(self, reader: TensorFileReader, start: int, count: int, cols: int, out: np.ndarray) -> None:
        update, model = self.update, self.model
        stored = reader.read(update.replacement or model, start, count)
        with np.errstate(all="ignore"):  # NaN/Inf from bad factors: refused just below
            delta = self._delta(reader, start, count, cols) if update.a is not None else None
            if (
                delta is not None
                and update.replacement is None
                and not update.embedding
                and out.dtype in KERNEL_DTYPES
            ):
                non_finite = add_in_storage_(out, stored, delta)  # the usual case, in one pass
            else:
                weight = to_float32(stored)
                if update.replacement is not None:  # PEFT loads it into the model's weight: rounded
                    weight = _rounded(weight, model)
                if delta is not None:
                    weight += _rounded(delta, model) if update.embedding else delta
                out[:], non_finite = from_float32(weight, model.dtype)
        if non_finite:
            raise NonFiniteError(
                f"model '{self.ref}': tensor '{self.name}' holds {non_finite} NaN/Inf value(s) "
                "with the adapter applied"
            )

    def _delta(self, reader: TensorFileReader, start: int, count: int, cols: int) -> np.ndarray:
        """s·B·A (or its transpose) at elements [start, start+count), float32: the product's
        rows that hold them, from the rows of B (or the columns of A) they need."""
        update = self.update
        a, b = update.a, update.b
        first, last = start // cols, -(-(start + count) // cols)
        memo = ReadMemo.of(reader)
        # left: a row per row of the product (B, or Aᵀ when transposed); right: all of the other.
        right = memo.factor(self, b if update.transposed else a, reader, transposed=update.transposed)
        whole = memo.factor(
            self, a if update.transposed else b, reader, transposed=update.transposed, optional=True
        )
        if whole is not None:
            left = whole[first:last]
        elif update.transposed:  # one read per rank: a column range of each row of A
            left = np.empty((last - first, a.shape[0]), dtype=np.float32)
            for k in range(a.shape[0]):
                left[:, k] = to_float32(reader.read(a, k * a.shape[1] + first, last - first))
        else:  # rows first..last of B: one range
            rank = b.shape[1]
            left = to_float32(reader.read(b, first * rank, (last - first) * rank)).reshape(-1, rank)
        product = np.empty((last - first, cols), dtype=np.float32)
        scaled_product_in_rank_order_(left, right, np.float32(update.scale), product)
        offset = start - first * cols
        return product.reshape(-1)[offset : offset + count]


# Elements of an adapted tensor computed at once (whole rows, at least one): a few float32
# buffers of this size are what applying an adapter holds.
READ_BLOCK = 1 << 20


class ReadMemo:
    """What reading one adapted tensor computes that later reads of it reuse: its LoRA factors
    in float32, whole (read once per tensor rather than once per chunk; from S3, a request
    each), and after a whole read (a TIES-like statistic) the adapted values themselves (the
    merge's chunks then copy them rather than compute them again). For the tensor being read,
    of every model that adapts it, up to MEMO_BYTES: beyond that a read computes what it needs
    (an embedding's factors of a large vocabulary, or many experts' whole tensors, need not
    fit). Forgotten when a read of another tensor begins."""

    KEY = "adapted tensors"  # its key in TensorFileReader.derived
    MEMO_BYTES = 128 << 20

    def __init__(self) -> None:
        self._tensor: str | None = None
        self._arrays: dict = {}
        self._bytes = 0

    @classmethod
    def of(cls, reader: TensorFileReader) -> ReadMemo:
        return reader.derived.setdefault(cls.KEY, cls())

    def get(self, tensor: str, key) -> np.ndarray | None:
        """What is kept under `key` for the tensor named `tensor` (a read of it begins)."""
        if tensor != self._tensor:
            self._tensor, self._arrays, self._bytes = tensor, {}, 0
        return self._arrays.get(key)

    def has_room(self, nbytes: int) -> bool:
        return self._bytes + nbytes <= self.MEMO_BYTES

    def keep(self, key, array: np.ndarray) -> None:
        """`array` (which no one changes afterwards) under `key`, if there is room."""
        if self.has_room(array.nbytes):
            self._arrays[key] = array
            self._bytes += array.nbytes

    def factor(
        self,
        tensor: AdaptedTensor,
        entry: TensorEntry,
        reader: TensorFileReader,
        transposed: bool = False,
        optional: bool = False,
    ) -> np.ndarray | None:
        """`entry` (a factor of `tensor`) in float32, as a contiguous 2-D array, transposed when
        asked; when `optional`, None instead of reading it whole where the memo has no room."""
        key = (entry, transposed)
        kept = self.get(tensor.name, key)
        if kept is not None:
            return kept
        if optional and not self.has_room(4 * entry.numel):
            return None
        array = to_float32(reader.read(entry, 0, entry.numel)).reshape(entry.shape)
        array = np.ascontiguousarray(array.T) if transposed else array
        self.keep(key, array)
        return array


@njit(parallel=True, cache=True, fastmath={"contract"})
def scaled_product_in_rank_order_(left, right, scale, out):
    """out = (left · right) · scale, each entry of the product summed over the rank index k in
    order, one fused multiply-add per step, then multiplied by `scale` (PEFT's s·B·A: torch's
    CPU product gives the same bits for LoRA factors; numpy's BLAS changes its order with the
    number of rows). Four steps per pass over a row keep the partial sums in registers."""
    rows, rank = left.shape
    cols = out.shape[1]
    for i in prange(rows):
        row = out[i]
        k = 0
        if rank >= 4:
            x0, x1, x2, x3 = left[i, 0], left[i, 1], left[i, 2], left[i, 3]
            r0, r1, r2, r3 = right[0], right[1], right[2], right[3]
            for j in range(cols):
                row[j] = x3 * r3[j] + (x2 * r2[j] + (x1 * r1[j] + x0 * r0[j]))
            k = 4
        else:
            for j in range(cols):
                row[j] = 0.0
        while k + 4 <= rank:
            x0, x1, x2, x3 = left[i, k], left[i, k + 1], left[i, k + 2], left[i, k + 3]
            r0, r1, r2, r3 = right[k], right[k + 1], right[k + 2], right[k + 3]
            for j in range(cols):
                row[j] = x3 * r3[j] + (x2 * r2[j] + (x1 * r1[j] + (x0 * r0[j] + row[j])))
            k += 4
        while k < rank:
            x, r = left[i, k], right[k]
            for j in range(cols):
                row[j] += x * r[j]
            k += 1
        for j in range(cols):
            row[j] *= scale


@njit(parallel=True, cache=True)
def add_in_storage_(out, values, delta):
    """out = values + delta, computed in float32 and stored as `out` stores it (float32, or
    bfloat16 bit patterns: `values` too); returns how many results are NaN or ±Inf."""
    bad = 0
    for j in prange(out.size):
        x = widen(values[j]) + delta[j]
        bad += x - x != 0
        out[j] = stored(x, out)
    return bad


def adapted_tensors(ref: str, updates: list[TensorUpdate], tensors: dict[str, TensorEntry]) -> dict:
    """The model's `tensors` that `updates` change, as AdaptedTensor entries of model `ref`."""
    return {u.target: AdaptedTensor(ref, tensors[u.target], u) for u in updates}


def _rounded(values: np.ndarray, entry: TensorEntry) -> np.ndarray:
    """float32 `values` rounded to `entry`'s dtype, as float32 again."""
    return to_float32(from_float32(values, entry.dtype)[0])
