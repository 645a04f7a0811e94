"""One tensor of a merge: per-model statistics over whole tensors, then the method over
chunks of every model read into reused buffers (the next chunk read while this one merges)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from mergeflow.errors import NonFiniteError
from mergeflow.methods import Chunk
from mergeflow.methods.primitives import Magnitudes, NonFiniteInput, kernel_array


class Workspace:
    """float32 buffers for one chunk of the base and of every model, reused all merge long."""

    def __init__(self, chunk: int, n_models: int, itemsize: int, largest: int) -> None:
        self.chunk = chunk
        self.base = torch.empty(chunk, dtype=torch.float32)
        self.models = torch.empty(chunk * n_models, dtype=torch.float32)
        # Two slots of raw bytes (base + models): the IO thread fills one while the other is
        # converted. `itemsize` is the largest element size among the inputs.
        self._slot_bytes = chunk * itemsize
        self._raw = [torch.empty(self._slot_bytes * (n_models + 1), dtype=torch.uint8) for _ in range(2)]
        self._largest, self._itemsize = largest, itemsize
        self._whole: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def whole_tensor(self, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two float32 buffers (base, model) and raw bytes for a whole tensor, for per-model
        statistics. Allocated once at the size of the largest tensor, so their pages fault in
        only once."""
        if self._whole is None:
            self._whole = (
                torch.empty(self._largest, dtype=torch.float32),
                torch.empty(self._largest, dtype=torch.float32),
                torch.empty(self._largest * self._itemsize, dtype=torch.uint8),
            )
        base, model, raw = self._whole
        return base[:numel], model[:numel], raw

    def raw_views(self, slot: int, nbytes: list[int]) -> list[torch.Tensor]:
        """Byte buffers of the given sizes in `slot`, back to back: the models of one chunk,
        all bfloat16, form one contiguous [N, count] block."""
        raw, views, offset = self._raw[slot], [], 0
        for size in nbytes:
            views.append(raw[offset : offset + size])
            offset += size
        return views


# How the kernels see a tensor's bytes (numpy has no bfloat16: its bit patterns).
_KERNEL_VIEWS = {torch.bfloat16: np.uint16, torch.float32: np.float32}


def chunk_elements(work_bytes: int, n_models: int) -> int:
    """Elements per chunk: models + base + scratch in float32 fit in `work_bytes`."""
    return max(1024, work_bytes // (4 * (n_models + 4)))


class TensorMerge:
    """Statistics then chunked merge for one tensor."""

    def __init__(self, target, method, base_entry, entries, deltas, params, reader, io, workspace) -> None:
        self.target, self.method, self.params = target, method, params
        self.base_entry, self.entries, self.deltas = base_entry, entries, deltas
        self.reader, self.io, self.workspace = reader, io, workspace
        self.chunk = workspace.chunk
        self.numel = math.prod(target.shape)

    def run(self) -> Iterator[torch.Tensor]:
        stats = self._statistics()
        for start, base, models in self._chunks():
            chunk = Chunk(self.target.name, start, base, models, self.params, stats)
            try:
                merged = self.method.merge(chunk)
            except NonFiniteInput:
                self._name_non_finite_input(start, models.shape[1])
                raise
            # NaN/Inf inputs reach the output of methods that do not sparsify; one sum finds it.
            if not math.isfinite(float(merged.sum())):
                self._name_non_finite_input(start, models.shape[1])
                if not torch.isfinite(merged).all():
                    raise NonFiniteError(
                        f"tensor '{self.target.name}': merged values overflow to Inf/NaN "
                        "(check lambda and the weights)"
                    )
            yield merged

    def _statistics(self):
        method = self.method
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
            return torch.stack(stats)
        if method.gram_rows is not None:
            gram = None
            for _, base, models in self._chunks():
                rows = method.gram_rows(base, models).double()
                gram = rows @ rows.T if gram is None else gram.add_(rows @ rows.T)
            return method.gram_statistic(gram, self.params)
        return None

    def _read_whole(self, entry, buffer: torch.Tensor, raw: torch.Tensor):
        """One whole tensor as the kernels read it. bfloat16 (as bit patterns) and float32 in
        a local file are the file's pages, mapped (copying them cost a quarter of the
        statistics' time); from S3 they are read straight into `buffer`'s bytes. Other dtypes
        go through `raw` into float32."""
        if entry.dtype in _KERNEL_VIEWS and (mapped := self.reader.map(entry)) is not None:
            return mapped.view(_KERNEL_VIEWS[entry.dtype])
        if entry.dtype in _KERNEL_VIEWS:
            return kernel_array(self.reader.read(entry, 0, self.numel, into=buffer.view(torch.uint8)))
        return kernel_array(buffer.copy_(self.reader.read(entry, 0, self.numel, into=raw)))

    def _params_of_model(self, i: int) -> dict:
        return {k: float(v[i]) if isinstance(v, torch.Tensor) else v for k, v in self.params.items()}

    def _chunks(self) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor]]:
        """(start, base float32, models [N, count] float32, or bfloat16 as stored when the
        method reads that), prefetching the next chunk."""
        starts = list(range(0, self.numel, self.chunk))
        if not starts:
            return
        as_stored = (
            self.method.reads_bfloat16
            and all(e.dtype == torch.bfloat16 for e in self.entries)
            and not any(self.deltas)
        )
        pending = self.io.submit(self._read_raw, starts[0], 0)
        for i, start in enumerate(starts):
            raw_base, raw_models = pending.result()
            if i + 1 < len(starts):  # read the next chunk into the other buffer slot meanwhile
                pending = self.io.submit(self._read_raw, starts[i + 1], (i + 1) % 2)
            count = raw_models[0].numel()
            # Views of buffers reused for every chunk: fresh allocations this large would pay
            # page faults on every pass. Flat slices keep each view contiguous.
            base = self.workspace.base[:count].copy_(raw_base) if raw_base is not None else None
            if as_stored:  # the models' chunks lie back to back in the read buffer
                first = raw_models[0]
                models = first.as_strided((len(raw_models), count), (count, 1))
                yield start, base, models
                continue
            models = self.workspace.models[: len(raw_models) * count].view(len(raw_models), count)
            for row, raw, delta in zip(models, raw_models, self.deltas, strict=True):
                row.copy_(raw)
                if delta:
                    row.add_(base)
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
            data = self.reader.read(entry, start, count).float()
            if not torch.isfinite(data).all():
                bad = int((~torch.isfinite(data)).sum())
                raise NonFiniteError(f"{entry.file.uri}: tensor '{entry.name}' holds {bad} NaN/Inf value(s)")
