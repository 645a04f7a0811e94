"""Whether models can be merged tensor by tensor, checked before any heavy work: same
architecture (unless allowed otherwise) and vocabulary, the same tensor names and shapes,
float weights where the reference has them. Each refusal names both models and the tensor or
field that differs."""

from __future__ import annotations

from mergeflow.checkpoint import Checkpoint
from mergeflow.errors import IncompatibleModelsError
from mergeflow.safetensors_io import TensorEntry


def check_same_architecture(reference: Checkpoint, others: list[Checkpoint]) -> None:
    """The architecture config.json names is the reference's. mergekit refuses others unless
    given --allow-crimes, and so does mergeflow; the tensors are checked either way."""
    ref_arch = _architecture(reference)
    for other in others:
        arch = _architecture(other)
        if ref_arch and arch and ref_arch != arch:
            raise IncompatibleModelsError(
                f"architectures differ: '{reference.ref}' is {ref_arch}, '{other.ref}' is {arch}; "
                "--allow-crimes merges them where their tensors match, as in mergekit"
            )


def check_same_vocabulary(reference: Checkpoint, others: list[Checkpoint]) -> None:
    """The same vocabulary size as the reference."""
    for other in others:
        _check_vocab(reference, other)


def check_compatible(reference: Checkpoint, experts: list[Checkpoint]) -> None:
    """Before heavy work: same vocabulary size, same tensor names and shapes, float weights
    (the architecture: check_same_architecture)."""
    for other in experts:
        if other is reference:
            continue
        check_same_vocabulary(reference, [other])
        missing = [n for n in reference.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in reference.tensors]
        if missing or extra:
            detail = f"lacks '{missing[0]}'" if missing else f"has extra tensor '{extra[0]}'"
            raise IncompatibleModelsError(
                f"tensor names differ: '{other.ref}' {detail} compared with '{reference.ref}' "
                f"({len(missing)} missing, {len(extra)} extra)"
            )
        for name, entry in reference.tensors.items():
            check_same_shapes(name, [entry, other.tensors[name]], [reference, other])


def check_same_shapes(name: str, entries: list[TensorEntry], owners: list[Checkpoint]) -> None:
    """The input tensors merged into output tensor `name` (`entries`, of models `owners`) have
    the first one's shape and are float where it is. A source named otherwise than the output
    (a layer slice's) is named too."""

    def where(entry: TensorEntry, owner: Checkpoint) -> str:
        return f"'{owner.ref}'" if entry.name == name else f"'{owner.ref}' (its '{entry.name}')"

    first, first_owner = entries[0], owners[0]
    for entry, owner in zip(entries[1:], owners[1:], strict=True):
        if entry.shape != first.shape:
            raise IncompatibleModelsError(
                f"tensor '{name}': shape {list(entry.shape)} in {where(entry, owner)} but "
                f"{list(first.shape)} in {where(first, first_owner)}"
            )
        if entry.dtype.is_float != first.dtype.is_float:
            raise IncompatibleModelsError(
                f"tensor '{name}': dtype {entry.dtype} in {where(entry, owner)} "
                f"but {first.dtype} in {where(first, first_owner)}"
            )


def _architecture(checkpoint: Checkpoint) -> str | None:
    config = checkpoint.config or {}
    arch = config.get("architectures") or config.get("model_type")
    return ",".join(arch) if isinstance(arch, list) else arch


def _check_vocab(reference: Checkpoint, other: Checkpoint) -> None:
    mine, theirs = _vocab_size(reference), _vocab_size(other)
    if mine is not None and theirs is not None and mine != theirs:
        raise IncompatibleModelsError(
            f"vocab sizes differ: '{reference.ref}' has vocab_size {mine}, '{other.ref}' has "
            f"{theirs}; give tokenizer_source (union, base or a model) to realign their embeddings"
        )


def _vocab_size(checkpoint: Checkpoint):
    return (checkpoint.config or {}).get("vocab_size")
