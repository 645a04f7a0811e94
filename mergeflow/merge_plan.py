"""A merge's inputs opened and checked before any heavy work, and what it will write: the
engine's first step, and all of `mergeflow merge --dry-run` (check_merge)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mergeflow.chat_template import chosen_chat_template
from mergeflow.checkpoint import Checkpoint, open_checkpoint
from mergeflow.compatibility import check_compatible, check_same_architecture
from mergeflow.config import MergeConfig
from mergeflow.errors import ConfigError
from mergeflow.hashing import model_sha256
from mergeflow.layer_names import is_input_embedding
from mergeflow.layout import Layout, group_base, sliced_layout, whole_model_layout
from mergeflow.methods import MergeMethod
from mergeflow.methods.kernels import default_threads
from mergeflow.name_prefix import match_name_prefixes
from mergeflow.output import DEFAULT_SHARD_BYTES, check_output_free, shard_groups
from mergeflow.parameters import resolve_parameters
from mergeflow.realigned_tensor import realign
from mergeflow.safetensors_io import DType, PlannedTensor
from mergeflow.storage import locate
from mergeflow.task_vectors import check_task_vectors_match_base, task_vector_info
from mergeflow.tied_head import match_tied_heads
from mergeflow.vocabulary import OutputVocabulary, plan_vocabulary

# Inputs opened at once: see Inputs.load.
MAX_OPENING_AT_ONCE = 2


@dataclass(frozen=True)
class MergeCheck:
    """What a merge would write, from a check that opened and checked every input and wrote
    nothing (mergeflow merge --dry-run)."""

    output: str
    models: int
    tensors: int
    bytes: int
    shards: int
    layers: int | None  # of a sliced output
    vocabulary_rows: int | None  # where embeddings are realigned to a tokenizer source


class Inputs:
    """The input checkpoints a merge opens, each closed when the merge ends."""

    def __init__(self, threads: int, allow_pickle: bool, allow_crimes: bool) -> None:
        # allow_crimes: merge models whose config.json names another architecture (mergekit's
        # --allow-crimes); their tensors are checked all the same
        self.threads, self.allow_pickle, self.allow_crimes = threads, allow_pickle, allow_crimes
        self.opened: list[Checkpoint] = []

    def load(self, refs: list[str]) -> list[Checkpoint]:
        """Open `refs` on up to two threads (headers from S3 and converted pickles take a
        while; a pickle is in memory whole while it converts). A bad one is refused, the first
        in the order of `refs`; whatever did open is closed with the rest on failure."""
        pool = ThreadPoolExecutor(
            max_workers=min(self.threads, MAX_OPENING_AT_ONCE), thread_name_prefix="mergeflow-open"
        )
        futures = [pool.submit(open_checkpoint, ref, self.allow_pickle) for ref in refs]
        try:
            return [future.result() for future in futures]
        finally:
            pool.shutdown(cancel_futures=True)
            self.opened.extend(f.result() for f in futures if not f.cancelled() and f.exception() is None)

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc) -> None:
        for checkpoint in self.opened:
            checkpoint.close()


@dataclass(frozen=True)
class PreparedMerge:
    """A merge's inputs opened and checked, and what it will write."""

    base: Checkpoint | None
    experts: list[Checkpoint]
    reference: Checkpoint
    tokenizer_source: Checkpoint
    vocabulary: OutputVocabulary | None
    layout: Layout
    plan: list[PlannedTensor]
    out_dtype: DType | None
    chat_template: str | None
    base_sha: str | None  # known early only where task vectors are checked against it

    @property
    def models(self) -> list[Checkpoint]:
        """Every model read: the base first, where there is one, then the experts."""
        return ([self.base] if self.base else []) + self.experts


def prepare_merge(config: MergeConfig, out: str, inputs: Inputs) -> PreparedMerge:
    """Open the models and make every check that comes before heavy work."""
    base_refs = [config.base_model] if config.base_model else []
    expert_refs = [entry.model for entry in config.experts()]
    loaded = inputs.load(base_refs + expert_refs)
    base, experts = (loaded[0], loaded[1:]) if base_refs else (None, loaded)
    reference = base or experts[0]
    by_ref = dict(zip(expert_refs, experts, strict=True))
    tokenizer_ref = config.tokenizer_reference()
    tokenizer_source = inputs.load([tokenizer_ref])[0] if tokenizer_ref else reference
    _check_no_input_is_replaced(out, inputs.opened)
    if not inputs.allow_crimes:
        check_same_architecture(reference, loaded)
    match_name_prefixes(reference, loaded)
    match_tied_heads(reference, loaded)
    vocabulary = _align_vocabularies(config, loaded, base, by_ref, tokenizer_source)
    if config.slices:
        layout = sliced_layout(config, base, by_ref, reference)
    else:
        check_compatible(reference, experts)
        layout = whole_model_layout(config, base, by_ref, reference)
    chat_template = chosen_chat_template(config.chat_template, loaded, tokenizer_source)
    out_dtype = config.output_dtype()
    plan = [
        PlannedTensor(
            t.name,
            out_dtype if out_dtype and t.reference.dtype.is_float else t.reference.dtype,
            t.reference.shape,
        )
        for t in layout.tensors
    ]
    _check_parameters_together(config, config.method, layout)
    # Task vector inputs are checked against the base's hash before any work. The other input
    # hashes are only needed for the manifest: a merge computes them as it goes, on the CPU time
    # its single-threaded steps leave idle.
    has_task_vectors = any(task_vector_info(c) is not None for c in experts)
    base_sha = model_sha256(base) if base and has_task_vectors else None
    check_task_vectors_match_base(base, base_sha, experts)
    return PreparedMerge(
        base,
        experts,
        reference,
        tokenizer_source,
        vocabulary,
        layout,
        plan,
        out_dtype,
        chat_template,
        base_sha,
    )


def check_merge(
    config: MergeConfig,
    out: str,
    *,
    threads: int | None = None,
    allow_pickle: bool = False,
    allow_crimes: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MergeCheck:
    """Open and check everything merging `config` into `out` would, and say what it would
    write; nothing is written (converted pickles are scratch files, gone after)."""
    with Inputs(threads or default_threads(), allow_pickle, allow_crimes) as inputs:
        prepared = prepare_merge(config, out, inputs)
        target = locate(out)
        check_output_free(target, overwrite)
        return MergeCheck(
            output=target.uri,
            models=len(prepared.models),
            tensors=len(prepared.plan),
            bytes=sum(t.nbytes for t in prepared.plan),
            shards=len(shard_groups(prepared.plan, max_shard_bytes)),
            layers=len(prepared.layout.layers) if prepared.layout.layers is not None else None,
            vocabulary_rows=prepared.vocabulary.rows if prepared.vocabulary else None,
        )


def _align_vocabularies(
    config: MergeConfig,
    models: list[Checkpoint],
    base: Checkpoint | None,
    by_ref: dict[str, Checkpoint],
    tokenizer: Checkpoint,
) -> OutputVocabulary | None:
    """With a tokenizer source in the config, the output's vocabulary, each of `models` (the
    base first, then the others, `by_ref`) with its vocabulary tensors realigned to it where
    they are not already (mergeflow.vocabulary); without one, the models must share a
    vocabulary (check_compatible checks their sizes)."""
    source = config.vocabulary_source()
    if source is None:
        return None
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
    vocabulary = plan_vocabulary(source, models, models[0], tokenizer, pad, config.token_sources())
    if vocabulary is not None:
        for model in models:
            if task_vector_info(model) is not None:
                raise ConfigError(
                    f"tokenizer source '{source}': '{model.ref}' is a task vector, whose embedding rows "
                    "cannot be realigned to the output's vocabulary; merge the expert itself"
                )
        groups = config.groups()

        def base_of(tensor: str) -> Checkpoint | None:
            """As in mergekit: the embeddings' is the first slice's base, the others' the last's
            (base_model for a method without a base)."""
            group = groups[0] if is_input_embedding(tensor) else groups[-1]
            return group_base(config, group, base, by_ref) or base

        realign(models, vocabulary, base_of)
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
