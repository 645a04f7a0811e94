"""The merge engine: stream every tensor of the inputs through a merge method into a
staged output.

Per tensor: resolve the method's parameters; compute its whole-tensor statistics (one model
at a time, or as a Gram matrix accumulated over chunks); then merge chunk by chunk. A chunk
holds at most `work_bytes` of float32 across all models, so peak memory is set by the budget
and the largest tensor, not by the number of models. The next chunk is read on an IO thread
while the current one is merged on torch's intra-op threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from tqdm import tqdm

import mergeflow
from mergeflow.checkpoint import TOKENIZER_FILES, Checkpoint, num_layers, open_checkpoint
from mergeflow.compatibility import FLOAT_DTYPES, check_compatible
from mergeflow.config import MergeConfig, resolve_parameters
from mergeflow.errors import NonFiniteError
from mergeflow.hashing import model_sha256, models_sha256
from mergeflow.methods import Chunk, MergeMethod
from mergeflow.methods.kernels import use_threads
from mergeflow.methods.primitives import Magnitudes, NonFiniteInput, kernel_array
from mergeflow.output import ShardedWriter, StagedOutput
from mergeflow.safetensors_io import PlannedTensor, TensorFileReader
from mergeflow.task_vectors import check_task_vectors_match_base, task_vector_info

log = logging.getLogger(__name__)

DEFAULT_WORK_BYTES = 64 << 20
DEFAULT_SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class MergeResult:
    output: str
    manifest: dict
    tensors: int
    bytes_written: int
    seconds: float


def merge(
    config: MergeConfig,
    out: str,
    *,
    threads: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    work_bytes: int = DEFAULT_WORK_BYTES,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> MergeResult:
    """Merge the models of `config` into `out` (a local path, file:// or s3:// URI)."""
    started = time.perf_counter()
    _release_large_blocks_to_the_os()
    # Without `threads`, as many as torch uses: a caller that limits torch (a one-thread Dask
    # worker) limits the kernels too.
    threads = threads or torch.get_num_threads()
    use_threads(threads)
    method = config.method
    opened: list[Checkpoint] = []
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-hash-inputs")

    def load(ref: str) -> Checkpoint:
        opened.append(open_checkpoint(ref, allow_pickle=allow_pickle))
        return opened[-1]

    try:
        base = load(config.base_model) if config.base_model else None
        experts = [load(entry.model) for entry in config.experts()]
        reference = base or experts[0]
        check_compatible(reference, experts)
        tokenizer_source = load(config.tokenizer_reference()) if config.tokenizer_reference() else reference
        out_dtype = config.output_dtype()
        plan = [
            PlannedTensor(e.name, out_dtype if out_dtype and e.dtype in FLOAT_DTYPES else e.dtype, e.shape)
            for e in reference.tensors.values()
        ]
        # Task vector inputs are checked against the base's hash before any work. The other
        # input hashes are only needed for the manifest: they are computed during the merge,
        # on the CPU time its single-threaded steps leave idle.
        has_task_vectors = any(task_vector_info(c) is not None for c in experts)
        base_sha = model_sha256(base) if base and has_task_vectors else None
        check_task_vectors_match_base(base, base_sha, experts)
        to_hash = ([base] if base and base_sha is None else []) + experts
        hashing = background.submit(models_sha256, to_hash, workers=torch.get_num_threads())
        stage = StagedOutput(out, overwrite=overwrite)
        try:
            # A writer thread is one more core at work: not for a caller that asked for one.
            writer = ShardedWriter(stage.folder, plan, max_shard_bytes, background=threads > 1)
            _merge_all(config, method, base, experts, reference, plan, writer, work_bytes, progress)
            hashes = hashing.result()
            if base and base_sha is None:
                base_sha = hashes.pop(0)
            inputs = {
                "base": {"ref": base.ref, "sha256": base_sha} if base else None,
                "models": [_input_record(c, sha) for c, sha in zip(experts, hashes, strict=True)],
            }
            files = writer.finish()
            files += _write_side_files(stage, reference, tokenizer_source, out_dtype)
            manifest = {
                "format": "mergeflow-manifest/1",
                "mergeflow_version": mergeflow.__version__,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "method": method.name,
                "config": config.model_dump(mode="json", exclude_defaults=True),
                "inputs": inputs,
                "files": [vars(f) for f in files],
            }
            stage.commit(manifest)
        except BaseException:
            writer_abort = locals().get("writer")
            if writer_abort is not None:
                writer_abort.abort()
            stage.discard()
            raise
    finally:
        background.shutdown(cancel_futures=True)
        for checkpoint in opened:
            checkpoint.close()
    seconds = time.perf_counter() - started
    written = sum(f["bytes"] for f in manifest["files"])
    log.info("merged %d tensors with %s into %s in %.1fs", len(plan), method.name, stage.target.uri, seconds)
    return MergeResult(stage.target.uri, manifest, len(plan), written, seconds)


def _input_record(checkpoint: Checkpoint, sha256: str) -> dict:
    """Lineage of one merged model: its hash and, for a task vector, the expert it came from."""
    record = {"ref": checkpoint.ref, "sha256": sha256}
    info = task_vector_info(checkpoint)
    if info is not None:
        record["task_vector_of"] = {"ref": info["expert"], "sha256": info["expert_sha256"]}
    return record


def _release_large_blocks_to_the_os() -> None:
    """Serve blocks >= 16 MB with mmap, so freed whole-tensor buffers go back to the OS at once,
    and keep smaller freed blocks (chunk outputs) for reuse.

    glibc otherwise raises its mmap threshold as large blocks are freed and keeps them in
    per-thread arenas: peak RSS of a merge grew ~70% that way (1.35 GB vs 0.78 GB for TIES
    with 8 experts). A fixed threshold of 1 MB avoided that but put every chunk-sized
    allocation on fresh pages: TIES with 2 experts took 373k page faults and 1.5-2.0 s of system
    time, against 115k and 1.0-1.2 s with these settings (peak RSS 600 MB against 563). The
    trim threshold keeps freed chunks in the heap instead of returning them after each one.
    No-op where glibc's mallopt is unavailable.
    """
    with contextlib.suppress(OSError, AttributeError):
        # The symbols already loaded into the process: ctypes.util.find_library would fork the
        # merge process to run ldconfig (a tree-wide RSS sample then counted its pages twice).
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _merge_all(
    config: MergeConfig,
    method: MergeMethod,
    base: Checkpoint | None,
    experts: list[Checkpoint],
    reference: Checkpoint,
    plan: list[PlannedTensor],
    writer: ShardedWriter,
    work_bytes: int,
    progress: bool,
) -> None:
    layers = num_layers(reference)
    n = len(experts)
    inputs = ([base] if base else []) + experts
    itemsize = max(e.dtype.itemsize for c in inputs for e in c.tensors.values())
    workspace = _Workspace(
        _chunk_elements(work_bytes, n), n, itemsize, max(t.numel for t in reference.tensors.values())
    )
    chunk = workspace.chunk
    # Task vector inputs hold τ; the engine adds the base back so every method sees models.
    deltas = [task_vector_info(c) is not None for c in experts]
    reader = TensorFileReader()
    bar = tqdm(
        total=sum(t.nbytes for t in plan),
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc=f"{method.name} ({n} models)",
        dynamic_ncols=True,
    )
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-read") as io:
            for i, target in enumerate(plan):
                bar.set_postfix_str(f"tensor {i + 1}/{len(plan)}")
                base_entry = base.tensors[target.name] if base else None
                entries = [c.tensors[target.name] for c in experts]
                ref_entry = reference.tensors[target.name]
                if ref_entry.dtype not in FLOAT_DTYPES:
                    _copy(reader, ref_entry, target, writer, chunk, bar)
                    continue
                params = resolve_parameters(config, target.name, layers)
                tensor = _TensorMerge(
                    target, method, base_entry, entries, deltas, params, reader, io, workspace
                )
                for merged in tensor.run():
                    # Written in the background: a method may return a view of the workspace
                    # (slerp does), which the next chunk overwrites, so the writer gets a copy.
                    writer.write(target.name, merged.to(target.dtype, copy=True))
                    bar.update(merged.numel() * target.dtype.itemsize)
    finally:
        bar.close()
        reader.close()


class _Workspace:
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


def _chunk_elements(work_bytes: int, n_models: int) -> int:
    """Elements per chunk: models + base + scratch in float32 fit in `work_bytes`."""
    return max(1024, work_bytes // (4 * (n_models + 4)))


def _copy(reader, entry, target, writer, chunk, bar) -> None:
    for start in range(0, entry.numel, chunk):
        data = reader.read(entry, start, min(chunk, entry.numel - start))
        writer.write(target.name, data)
        bar.update(data.numel() * target.dtype.itemsize)


class _TensorMerge:
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


def _write_side_files(stage: StagedOutput, reference: Checkpoint, tokenizer: Checkpoint, out_dtype) -> list:
    """config.json (dtype updated), generation config and tokenizer files."""
    import hashlib
    import json

    from mergeflow.output import WrittenFile

    written = []
    if reference.config is not None:
        config = dict(reference.config)
        if out_dtype is not None:
            name = str(out_dtype).removeprefix("torch.")
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = name
        written.append(("config.json", json.dumps(config, indent=2).encode()))
    if "generation_config.json" in reference.file_names:
        written.append(
            ("generation_config.json", reference.location.child("generation_config.json").read_bytes())
        )
    for name in TOKENIZER_FILES:
        if name in tokenizer.file_names:
            written.append((name, tokenizer.location.child(name).read_bytes()))
    files = []
    for name, data in written:
        (stage.folder / name).write_bytes(data)
        files.append(WrittenFile(name, hashlib.sha256(data).hexdigest(), len(data)))
    return files
