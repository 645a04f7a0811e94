"""Task vectors τ = expert − base, stored as checkpoints of their own and merged directly.

A task vector folder looks like the expert's checkpoint (same tensor names and shapes, float32
for float tensors; other tensors copied from the expert) and its config.json carries
`mergeflow_task_vector`: the base and expert references and content hashes. The engine accepts
such a folder wherever a model goes in `models[]`; it checks the merge's base is the base the
vector was computed from and reads τ instead of recomputing it. Merging stored vectors matches
merging the experts to float32 rounding: the engine sees base + τ where it would see the expert.

Vectors are keyed by (base hash, expert hash), so one computed for a pair serves every later
merge of that pair, whatever the method or its parameters.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import mergeflow
from mergeflow.checkpoint import CONFIG, MANIFEST, Checkpoint, open_checkpoint
from mergeflow.compatibility import check_compatible, check_same_architecture
from mergeflow.errors import CheckpointError, IncompatibleModelsError
from mergeflow.hashing import model_sha256
from mergeflow.methods.primitives import to_float32
from mergeflow.name_prefix import match_name_prefixes
from mergeflow.output import DEFAULT_SHARD_BYTES, ShardedWriter, StagedOutput, WrittenFile
from mergeflow.safetensors_io import FLOAT32, PlannedTensor, TensorFileReader
from mergeflow.storage import locate
from mergeflow.tied_head import match_tied_heads

MARKER = "mergeflow_task_vector"
CHUNK_ELEMENTS = 4 << 20


@dataclass(frozen=True)
class TaskVector:
    uri: str
    base_sha256: str
    expert_sha256: str
    computed: bool  # False when an existing vector was reused


def task_vector_info(checkpoint: Checkpoint) -> dict | None:
    """The `mergeflow_task_vector` record of a task vector checkpoint, None for a model."""
    return (checkpoint.config or {}).get(MARKER)


def task_vector_uri(store: str, base_sha256: str, expert_sha256: str) -> str:
    """Where the vector of (base, expert) lives under `store` (a path or s3:// prefix)."""
    return f"{store.rstrip('/')}/task-vectors/{base_sha256[:16]}-{expert_sha256[:16]}"


def is_complete(uri: str) -> bool:
    """A committed output: its manifest is written last."""
    return locate(uri).child(MANIFEST).exists()


def ensure_task_vector(base_ref: str, expert_ref: str, store: str) -> TaskVector:
    """The task vector of `expert_ref` over `base_ref` under `store`, computed only when absent."""
    base, expert = open_checkpoint(base_ref), open_checkpoint(expert_ref)
    try:
        base_sha, expert_sha = model_sha256(base), model_sha256(expert)
        uri = task_vector_uri(store, base_sha, expert_sha)
        if is_complete(uri):
            return TaskVector(uri, base_sha, expert_sha, computed=False)
        write_task_vector(base, expert, uri, base_sha, expert_sha)
        return TaskVector(uri, base_sha, expert_sha, computed=True)
    finally:
        base.close()
        expert.close()


def write_task_vector(base: Checkpoint, expert: Checkpoint, out: str, base_sha: str, expert_sha: str) -> None:
    """Stream τ = expert − base tensor by tensor (in chunks) into a staged checkpoint at `out`."""
    if task_vector_info(base) or task_vector_info(expert):
        which = base if task_vector_info(base) else expert
        raise CheckpointError(f"model '{which.ref}' is already a task vector; give the base and the expert")
    match_name_prefixes(base, [expert])
    match_tied_heads(base, [expert])
    check_same_architecture(base, [expert])
    check_compatible(base, [expert])
    started = time.perf_counter()
    plan = [
        PlannedTensor(name, FLOAT32 if e.dtype.is_float else e.dtype, e.shape)
        for name, e in expert.tensors.items()  # by key: a tied head's entry is named as the embeddings
    ]
    stage = StagedOutput(out, overwrite=True)
    reader = TensorFileReader()
    writer = ShardedWriter(stage.folder, plan, max_shard_bytes=DEFAULT_SHARD_BYTES)
    try:
        for target in plan:
            theirs, ours = expert.tensors[target.name], base.tensors[target.name]
            for start in range(0, max(theirs.numel, 1), CHUNK_ELEMENTS):  # an empty tensor: one empty chunk
                count = min(CHUNK_ELEMENTS, theirs.numel - start)
                data = reader.read(theirs, start, count)
                if target.dtype == FLOAT32:
                    data = to_float32(data)
                    data -= to_float32(reader.read(ours, start, count))
                writer.write(target.name, data)
        files = writer.finish()
        config = dict(expert.config or {})
        config[MARKER] = {
            "base": base.ref,
            "base_sha256": base_sha,
            "expert": expert.ref,
            "expert_sha256": expert_sha,
        }
        data = json.dumps(config, indent=2).encode()
        (stage.folder / CONFIG).write_bytes(data)
        files.append(WrittenFile(CONFIG, hashlib.sha256(data).hexdigest(), len(data)))
        stage.commit(
            {
                "format": "mergeflow-manifest/1",
                "kind": "task_vector",
                "mergeflow_version": mergeflow.__version__,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - started, 3),
                "inputs": {
                    "base": {"ref": base.ref, "sha256": base_sha},
                    "expert": {"ref": expert.ref, "sha256": expert_sha},
                },
                "files": [vars(f) for f in files],
            }
        )
    except BaseException:
        writer.abort()
        stage.discard()
        raise
    finally:
        reader.close()


def check_task_vectors_match_base(
    base: Checkpoint | None, base_sha: str | None, inputs: list[Checkpoint]
) -> None:
    """Every task vector among `inputs` was computed from this merge's base."""
    for checkpoint in inputs:
        info = task_vector_info(checkpoint)
        if info is None:
            continue
        if base is None:
            raise IncompatibleModelsError(
                f"model '{checkpoint.ref}' is a task vector; the merge needs its base_model ({info['base']})"
            )
        if info["base_sha256"] != base_sha:
            raise IncompatibleModelsError(
                f"task vector '{checkpoint.ref}' was computed from base {info['base']} "
                f"(sha256 {info['base_sha256'][:12]}…), not from this merge's base '{base.ref}' "
                f"(sha256 {base_sha[:12]}…)"
            )
