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
from mergeflow.chat_template import chosen_chat_template
from mergeflow.checkpoint import Checkpoint, open_checkpoint
from mergeflow.compatibility import check_compatible
from mergeflow.config import MergeConfig
from mergeflow.errors import ConfigError
from mergeflow.hashing import model_sha256, models_sha256
from mergeflow.layout import Layout, sliced_layout, whole_model_layout
from mergeflow.methods import MergeMethod
from mergeflow.methods.kernels import default_threads, use_threads
from mergeflow.model_card import MODEL_CARD, model_card
from mergeflow.output import DEFAULT_SHARD_BYTES, ShardedWriter, StagedOutput, write_small_file
from mergeflow.parameters import resolve_parameters
from mergeflow.realigned_tensor import realign
from mergeflow.safetensors_io import PlannedTensor, TensorFileReader
from mergeflow.side_files import write_side_files
from mergeflow.storage import locate
from mergeflow.task_vectors import check_task_vectors_match_base, task_vector_info
from mergeflow.tensor_merge import TensorMerge, Workspace, chunk_elements, row_length
from mergeflow.tied_head import match_tied_heads
from mergeflow.vocabulary import OutputVocabulary, plan_vocabulary, tokenizer_files

log = logging.getLogger(__name__)

# Chunks of a few hundred thousand elements per model merge as fast as larger ones and touch
# fewer fresh pages: side by side, TIES with 2 experts took 1.43-1.56 s against 1.52-1.70 s with
# 64 MB, dare_ties with 8 experts 2.09-2.17 s against 2.12-2.27 s; peak RSS ~55 MB lower.
DEFAULT_WORK_BYTES = 16 << 20
# Inputs opened at once: see merge's load().
MAX_OPENING_AT_ONCE = 2


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
    threads = threads or default_threads()
    use_threads(threads)
    method = config.method
    opened: list[Checkpoint] = []
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-hash-inputs")

    def load(refs: list[str]) -> list[Checkpoint]:
        """Open `refs` on up to two threads (headers from S3 and converted pickles take a
        while; a pickle is in memory whole while it converts). A bad one is refused, the first
        in the order of `refs`; whatever did open is closed with the rest on failure."""
        pool = ThreadPoolExecutor(
            max_workers=min(threads, MAX_OPENING_AT_ONCE), thread_name_prefix="mergeflow-open"
        )
        futures = [pool.submit(open_checkpoint, ref, allow_pickle) for ref in refs]
        try:
            return [future.result() for future in futures]
        finally:
            pool.shutdown(cancel_futures=True)
            opened.extend(f.result() for f in futures if not f.cancelled() and f.exception() is None)

    try:
        base_refs = [config.base_model] if config.base_model else []
        expert_refs = [entry.model for entry in config.experts()]
        loaded = load(base_refs + expert_refs)
        base, experts = (loaded[0], loaded[1:]) if base_refs else (None, loaded)
        reference = base or experts[0]
        by_ref = dict(zip(expert_refs, experts, strict=True))
        tokenizer_ref = config.tokenizer_reference()
        tokenizer_source = load([tokenizer_ref])[0] if tokenizer_ref else reference
        _check_no_input_is_replaced(out, opened)
        match_tied_heads(reference, loaded)
        vocabulary = _align_vocabularies(config, base, experts, tokenizer_source)
        if config.slices:
            layout = sliced_layout(config, base, by_ref, reference)
        else:
            check_compatible(reference, experts)
            layout = whole_model_layout(config, base, by_ref, reference)
        models = [base] if base else []
        chat_template = chosen_chat_template(config.chat_template, models + experts, tokenizer_source)
        out_dtype = config.output_dtype()
        plan = [
            PlannedTensor(
                t.name,
                out_dtype if out_dtype and t.reference.dtype.is_float else t.reference.dtype,
                t.reference.shape,
            )
            for t in layout.tensors
        ]
        _check_parameters_together(config, method, layout)
        # Task vector inputs are checked against the base's hash before any work. The other
        # input hashes are only needed for the manifest: they are computed during the merge,
        # on the CPU time its single-threaded steps leave idle.
        has_task_vectors = any(task_vector_info(c) is not None for c in experts)
        base_sha = model_sha256(base) if base and has_task_vectors else None
        check_task_vectors_match_base(base, base_sha, experts)
        to_hash = ([base] if base and base_sha is None else []) + experts
        hashing = background.submit(models_sha256, to_hash, workers=threads)
        stage = StagedOutput(out, overwrite=overwrite)
        try:
            # A writer thread is one more core at work: not for a caller that asked for one.
            writer = ShardedWriter(stage.folder, plan, max_shard_bytes, background=threads > 1)
            _merge_all(config, method, layout, plan, writer, work_bytes, progress, len(loaded))
            hashes = hashing.result()
            if base and base_sha is None:
                base_sha = hashes.pop(0)
            inputs = {
                "base": _reference(base) | {"sha256": base_sha} if base else None,
                "models": [_input_record(c, sha) for c, sha in zip(experts, hashes, strict=True)],
            }
            files = writer.finish()
            # the tokenizer source's files, or new ones where tokens were added to its vocabulary
            added_tokens_files = vocabulary.tokenizer_files if vocabulary else None
            output_tokenizer = added_tokens_files or tokenizer_files(tokenizer_source)
            files += write_side_files(stage, reference, layout, output_tokenizer, out_dtype, chat_template)
            card = model_card(config, inputs)
            files.append(write_small_file(stage.folder, MODEL_CARD, card.encode()))
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


def _align_vocabularies(
    config: MergeConfig, base: Checkpoint | None, experts: list[Checkpoint], tokenizer: Checkpoint
) -> OutputVocabulary | None:
    """With a tokenizer source in the config, the output's vocabulary, each model's
    vocabulary tensors realigned to it where they are not already (mergeflow.vocabulary);
    without one, the models must share a vocabulary (check_compatible checks their sizes)."""
    source = config.vocabulary_source()
    if source is None:
        return None
    models = ([base] if base else []) + experts
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
    vocabulary = plan_vocabulary(source, models, models[0], tokenizer, pad, config.token_sources())
    if vocabulary is not None:
        groups = config.groups()
        for group in (groups[0], groups[-1]):
            if group.base not in (None, config.base_model):
                raise ConfigError(
                    f"{group.base_key}: the first slice's base is the embeddings' and the last one's "
                    f"the output head's, but realigning them to tokenizer source '{source}' fills "
                    "rows from base_model alone; leave base_model out of the first and last slices"
                )
        for model in models:
            if task_vector_info(model) is not None:
                raise ConfigError(
                    f"tokenizer source '{source}': '{model.ref}' is a task vector, whose embedding rows "
                    "cannot be realigned to the output's vocabulary; merge the expert itself"
                )
        realign(models, vocabulary, base)
    return vocabulary


def _check_no_input_is_replaced(out: str, models: list[Checkpoint]) -> None:
    """The output does not go where an input is read from: committing it (with overwrite)
    would replace that input."""
    target = locate(out).uri
    for model in models:
        for location in [model.location, *model.identity_files.values()]:
            if location.uri == target or location.uri.startswith(f"{target}/"):
                raise ConfigError(
                    f"output '{target}': model '{model.ref}' is read from there, and the output would "
                    "replace it; write the merge elsewhere"
                )


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


def _check_parameters_together(config: MergeConfig, method: MergeMethod, layout: Layout) -> None:
    """The method's check of each tensor's parameter values together (filters and gradients
    give every tensor its own), before any work."""
    if method.parameter_check is None:
        return
    for tensor in layout.tensors:
        if not tensor.reference.dtype.is_float:
            continue
        problem = method.parameter_check(resolve_parameters(config, tensor.group, tensor.name, tensor.t))
        if problem is not None:
            i, text = problem
            model = tensor.group.entries[i].model
            raise ConfigError(f"{tensor.group.entry_field(i)} ('{model}'), tensor '{tensor.name}': {text}")


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
