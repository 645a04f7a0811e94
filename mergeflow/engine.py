"""The merge engine: stream every tensor of the inputs through a merge method into a
staged output.

Per tensor: resolve the method's parameters; compute its whole-tensor statistics (one model
at a time, or as a Gram matrix accumulated over chunks); then merge chunk by chunk. A chunk
holds at most `work_bytes` of float32 across all models, so peak memory is set by the budget
and the largest tensor, not by the number of models. The next chunk is read on an IO thread
while the current one is merged by the kernels' threads. Arrays are numpy; the engine does not
import torch (importing it took most of a small merge's time).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from tqdm import tqdm

import mergeflow
from mergeflow.checkpoint import Checkpoint
from mergeflow.config import MergeConfig
from mergeflow.hashing import models_sha256
from mergeflow.layout import Layout
from mergeflow.merge_plan import Inputs, prepare_merge
from mergeflow.methods import MergeMethod
from mergeflow.methods.kernels import default_threads, use_threads
from mergeflow.model_card import MODEL_CARD, model_card
from mergeflow.output import DEFAULT_SHARD_BYTES, ShardedWriter, StagedOutput, write_small_file
from mergeflow.parameters import resolve_parameters
from mergeflow.safetensors_io import PlannedTensor, TensorFileReader
from mergeflow.side_files import write_side_files
from mergeflow.task_vectors import task_vector_info
from mergeflow.tensor_merge import TensorMerge, Workspace, chunk_elements, row_length
from mergeflow.vocabulary import tokenizer_files

log = logging.getLogger(__name__)

# Chunks of a few hundred thousand elements per model merge as fast as larger ones and touch
# fewer fresh pages: side by side, TIES with 2 experts took 1.43-1.56 s against 1.52-1.70 s with
# 64 MB, dare_ties with 8 experts 2.09-2.17 s against 2.12-2.27 s; peak RSS ~55 MB lower.
DEFAULT_WORK_BYTES = 16 << 20


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
    allow_crimes: bool = False,
    overwrite: bool = False,
    work_bytes: int = DEFAULT_WORK_BYTES,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> MergeResult:
    """Merge the models of `config` into `out` (a local path, file:// or s3:// URI).
    `allow_crimes` merges models whose config.json names other architectures than the base's
    (the first model's) where their tensors match, as mergekit's --allow-crimes does."""
    started = time.perf_counter()
    _release_large_blocks_to_the_os()
    threads = threads or default_threads()
    use_threads(threads)
    method = config.method
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-hash-inputs")
    with Inputs(threads, allow_pickle, allow_crimes) as inputs:
        try:
            p = prepare_merge(config, out, inputs)
            base, experts, base_sha = p.base, p.experts, p.base_sha
            to_hash = ([base] if base and base_sha is None else []) + experts
            hashing = background.submit(models_sha256, to_hash, workers=threads)
            stage = StagedOutput(out, overwrite=overwrite)
            try:
                # A writer thread is one more core at work: not for a caller that asked for one.
                writer = ShardedWriter(stage.folder, p.plan, max_shard_bytes, background=threads > 1)
                _merge_all(config, method, p.layout, p.plan, writer, work_bytes, progress, len(p.models))
                hashes = hashing.result()
                if base and base_sha is None:
                    base_sha = hashes.pop(0)
                inputs_record = {
                    "base": _reference(base) | {"sha256": base_sha} if base else None,
                    "models": [_input_record(c, sha) for c, sha in zip(experts, hashes, strict=True)],
                }
                files = writer.finish()
                # the tokenizer source's files, or new ones where tokens were added to its vocabulary
                added_tokens_files = p.vocabulary.tokenizer_files if p.vocabulary else None
                output_tokenizer = added_tokens_files or tokenizer_files(p.tokenizer_source)
                files += write_side_files(
                    stage, p.reference, p.layout, output_tokenizer, p.out_dtype, p.chat_template
                )
                card = model_card(config, inputs_record)
                files.append(write_small_file(stage.folder, MODEL_CARD, card.encode()))
                manifest = {
                    "format": "mergeflow-manifest/1",
                    "mergeflow_version": mergeflow.__version__,
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "method": method.name,
                    "config": config.model_dump(mode="json", exclude_defaults=True),
                    "inputs": inputs_record,
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
    seconds = time.perf_counter() - started
    written = sum(f["bytes"] for f in manifest["files"])
    log.info(
        "merged %d tensors with %s into %s in %.1fs", len(p.plan), method.name, stage.target.uri, seconds
    )
    return MergeResult(stage.target.uri, manifest, len(p.plan), written, seconds)


def _reference(checkpoint: Checkpoint) -> dict:
    """How the config named an input and, for a repo id found in the Hugging Face cache, the
    commit it named at merge time."""
    if checkpoint.hub_commit is None:
        return {"ref": checkpoint.ref}
    return {"ref": checkpoint.ref, "hub_commit": checkpoint.hub_commit}


def _input_record(checkpoint: Checkpoint, sha256: str) -> dict:
    """Lineage of one merged model: its hash and, for a task vector, the expert it came from."""
    record = _reference(checkpoint) | {"sha256": sha256}
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
    layout: Layout,
    plan: list[PlannedTensor],
    writer: ShardedWriter,
    work_bytes: int,
    progress: bool,
    models: int,
) -> None:
    inputs = [e for t in layout.tensors for e in t.sources + ([t.base] if t.base else [])]
    n = max(len(t.sources) for t in layout.tensors)
    itemsize = max(e.dtype.itemsize for e in inputs)
    chunk = chunk_elements(work_bytes, n)
    if method.whole_rows:
        chunk = max(chunk, *(row_length(t.shape) for t in plan))
    workspace = Workspace(chunk, n, itemsize, max(t.reference.numel for t in layout.tensors))
    chunk = workspace.chunk
    reader = TensorFileReader()
    bar = tqdm(
        total=sum(t.nbytes for t in plan),
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc=f"{method.name} ({models} models)",
        dynamic_ncols=True,
    )
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-read") as io:
            for i, (tensor, target) in enumerate(zip(layout.tensors, plan, strict=True)):
                bar.set_postfix_str(f"tensor {i + 1}/{len(plan)}")
                if not tensor.reference.dtype.is_float:
                    _copy(reader, tensor.reference, target, writer, chunk, bar)
                    continue
                params = resolve_parameters(config, tensor.group, tensor.name, tensor.t)
                tensor_merge = TensorMerge(
                    target, method, tensor.base, tensor.sources, tensor.deltas, params, reader, io, workspace
                )
                for merged in tensor_merge.run():
                    writer.write(target.name, merged)
                    bar.update(merged.nbytes)
    finally:
        bar.close()
        reader.close()


def _copy(reader, entry, target, writer, chunk, bar) -> None:
    for start in range(0, entry.numel, chunk):
        data = reader.read(entry, start, min(chunk, entry.numel - start))
        writer.write(target.name, data)
        bar.update(data.nbytes)
