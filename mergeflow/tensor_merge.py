"""One tensor of a merge: per-model statistics over whole tensors, then the method over
chunks of every model read into reused buffers (the next chunk read while this one merges)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from mergeflow.errors import NonFiniteError
from mergeflow.methods import Chunk
from mergeflow.methods.primitives import (
    KERNEL_DTYPES,
    Magnitudes,
    NonFiniteInput,
    NonFiniteOutput,
    from_float32,
    kernel_array,
    to_float32,
)
from mergeflow.safetensors_io import BFLOAT16


class Workspace:
    """float32 buffers for one chunk of the base and of every model, reused all merge long."""

    def __init__(self, chunk: int, n_models: int, itemsize: int, largest: int) -> None:
        self.chunk = chunk
        self.base = np.empty(chunk, dtype=np.float32)
        self.models = np.empty(chunk * n_models, dtype=np.float32)
        # Two slots of raw bytes (base + models): the IO thread fills one while the other is
        # converted. `itemsize` is the largest element size among the inputs.
        self._slot_bytes = chunk * itemsize
        self._raw = [np.empty(self._slot_bytes * (n_models + 1), dtype=np.uint8) for _ in range(2)]
        self._largest, self._itemsize = largest, itemsize
        self._whole: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def whole_tensor(self, numel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Two float32 buffers (base, model) and raw bytes for a whole tensor, for statistics
        (the model buffer is also a chunk statistic's scratch). Allocated once at the size of
        the largest tensor, so their pages fault in only once."""
        if self._whole is None:
            self._whole = (
                np.empty(self._largest, dtype=np.float32),
                np.empty(self._largest, dtype=np.float32),
                np.empty(self._largest * self._itemsize, dtype=np.uint8),
            )
        base, model, raw = self._whole
        return base[:numel], model[:numel], raw

    def raw_views(self, slot: int, nbytes: list[int]) -> list[np.ndarray]:
        """Byte buffers of the given sizes in `slot`, back to back: the models of one chunk,
        all bfloat16, form one contiguous [N, count] block (`stored_models`)."""
        raw, views, offset = self._raw[slot], [], 0
        for size in nbytes:
            views.append(raw[offset : offset + size])
            offset += size
        return views

    def stored_models(self, slot: int, n_models: int, count: int) -> np.ndarray:
        """The [N, count] bfloat16 bit patterns that `raw_views` laid out in `slot`."""
        return self._raw[slot][: n_models * count * 2].view(np.uint16).reshape(n_models, count)


def chunk_elements(work_bytes: int, n_models: int) -> int:
    """Elements per chunk: models + base + scratch in float32 fit in `work_bytes`."""
    return max(1024, work_bytes // (4 * (n_models + 4)))


def row_length(shape: tuple[int, ...] | list[int]) -> int:
    """Elements in one row of a tensor: its last dimension; a 1-D tensor is one row."""
    return shape[-1] if len(shape) >= 2 else math.prod(shape)


class TensorMerge:
    """Statistics then chunked merge for one tensor (a `TensorChunks` to the method's
    chunk statistic)."""

    def __init__(self, target, method, base_entry, entries, deltas, params, reader, io, workspace) -> None:
        self.target, self.method, self.params = target, method, params
        self.base_entry, self.entries, self.deltas = base_entry, entries, deltas
        self.reader, self.io, self.workspace = reader, io, workspace
        self.name, self.shape, self.n_models = target.name, tuple(target.shape), len(entries)
        self.numel, self.has_base = math.prod(self.shape), base_entry is not None
        self.chunk, self.row_length = workspace.chunk, 0
        if method.whole_rows:  # whole rows per chunk; the workspace holds at least the longest
            self.row_length = max(1, row_length(target.shape))
            self.chunk -= self.chunk % self.row_length

    def run(self) -> Iterator[np.ndarray]:
        """The merged tensor's chunks, in the target's storage dtype."""
        stats = self._statistics()
        storage = self.target.dtype.storage
        # A method that writes the output's storage itself spares a float32 pass per chunk.
        writes_storage = self.method.writes_storage and storage in KERNEL_DTYPES
        chunk_storage = storage if writes_storage else np.float32
        for start, base, models in self.chunks():
            chunk = Chunk(
                self.target.name, start, base, models, self.params, stats, chunk_storage, self.row_length
            )
            try:
                merged = self.method.merge(chunk)
            except NonFiniteInput:
                self._name_non_finite_input(start, models.shape[1])
                raise
            except NonFiniteOutput as overflow:
                raise self._overflow_error(start, models.shape[1]) from overflow
            if writes_storage:
                yield merged
                continue
            # A new array, so the background writer may keep it while the next chunk reuses the
            # workspace (slerp returns a view of it). NaN/Inf inputs reach the output of methods
            # that do not sparsify: the conversion counts them.
            stored, non_finite = from_float32(merged, self.target.dtype)
            if non_finite:
                raise self._overflow_error(start, models.shape[1])
            yield stored

    def _overflow_error(self, start: int, count: int) -> NonFiniteError:
        """The error for NaN/Inf merged values: the input's, raised here, when one holds them."""
        self._name_non_finite_input(start, count)
        return NonFiniteError(
            f"tensor '{self.target.name}': merged values overflow to Inf/NaN (check lambda and the weights)"
        )

    def _statistics(self):
        method = self.method
        if self.numel == 0:  # no chunk to merge
            return None
        if method.model_statistic is not None:
            # Whole tensors, one model at a time: memory does not grow with the number of models.
            # |τ| is never stored; the statistic's scans compute it from the model and the base.
            base_buffer, values_buffer, raw = self.workspace.whole_tensor(self.numel)
            base = self._read_whole(self.base_entry, base_buffer, raw)
            stats = []
            for i, entry in enumerate(self.entries):
                model = self._read_whole(entry, values_buffer, raw)
                magnitudes = Magnitudes(model, None if self.deltas[i] else base)
                stats.append(method.model_statistic(magnitudes, self._params_of_model(i)))
            return np.stack(stats)
        if method.chunk_statistic is not None:
            return method.chunk_statistic(self, self.params)
        return None

    def scratch(self) -> np.ndarray:
        return self.workspace.whole_tensor(self.numel)[1]

    def _read_whole(self, entry, buffer: np.ndarray, raw: np.ndarray):
        """One whole tensor as the kernels read it. bfloat16 (as bit patterns) and float32 in
        a local file are the file's pages, mapped (copying them cost a quarter of the
        statistics' time); from S3 they are read straight into `buffer`'s bytes. Other dtypes
        go through `raw` into float32."""
        as_stored = entry.dtype.storage in KERNEL_DTYPES
        if as_stored and (mapped := self.reader.map(entry)) is not None:
            return mapped.view(entry.dtype.storage)
        stored = self.reader.read(entry, 0, self.numel, into=buffer.view(np.uint8) if as_stored else raw)
        return kernel_array(stored, out=buffer)

    def _params_of_model(self, i: int) -> dict:
        return {k: float(v[i]) if isinstance(v, np.ndarray) else v for k, v in self.params.items()}

    def chunks(self) -> Iterator[tuple[int, np.ndarray | None, np.ndarray]]:
        """(start, base, models [N, count]), prefetching the next chunk: float32, or for a
        method that reads bfloat16 and bfloat16 models, the models and a float32 or bfloat16
        base as stored."""
        starts = list(range(0, self.numel, self.chunk))
        if not starts:
            return
        as_stored = (
            self.method.reads_bfloat16
            and all(e.dtype == BFLOAT16 for e in self.entries)
            and not any(self.deltas)
        )
        pending = self.io.submit(self._read_raw, starts[0], 0)
        for i, start in enumerate(starts):
            raw_base, raw_models = pending.result()
            if i + 1 < len(starts):  # read the next chunk into the other buffer slot meanwhile
                pending = self.io.submit(self._read_raw, starts[i + 1], (i + 1) % 2)
            count = raw_models[0].size
            # Views of buffers reused for every chunk: fresh allocations this large would pay
            # page faults on every pass. Flat slices keep each view contiguous.
            if as_stored:  # the models' chunks lie back to back in the read buffer; the base as read
                models = self.workspace.stored_models(i % 2, len(raw_models), count)
                if raw_base is not None:
                    raw_base = kernel_array(raw_base, out=self.workspace.base[:count])
                yield start, raw_base, models
                continue
            base = to_float32(raw_base, out=self.workspace.base[:count]) if raw_base is not None else None
            models = self.workspace.models[: len(raw_models) * count].reshape(len(raw_models), count)
            for row, raw, delta in zip(models, raw_models, self.deltas, strict=True):
                to_float32(raw, out=row)
                if delta:
                    row += base
            yield start, base, models

    def _read_raw(self, start: int, slot: int):
        """Raw chunks of every model and the base, read into buffer slot `slot`."""
        count = min(self.chunk, self.numel - start)
        inputs = self.entries + ([self.base_entry] if self.base_entry else [])
        buffers = self.workspace.raw_views(slot, [count * e.dtype.itemsize for e in inputs])
        models = [self.reader.read(e, start, count, b) for e, b in zip(self.entries, buffers, strict=False)]
        base = self.reader.read(self.base_entry, start, count, buffers[-1]) if self.base_entry else None
        return base, models

    def _name_non_finite_input(self, start: int, count: int) -> None:
        """Re-read one chunk of every input and raise for the first holding NaN or Inf."""
        for entry in ([self.base_entry] if self.base_entry else []) + self.entries:
            data = to_float32(self.reader.read(entry, start, count))
            if not np.isfinite(data).all():
                bad = int((~np.isfinite(data)).sum())
                raise NonFiniteError(f"{entry.file.uri}: tensor '{entry.name}' holds {bad} NaN/Inf value(s)")
