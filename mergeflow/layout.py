"""Which input tensors make each output tensor of a merge.

A `models:` config merges each tensor of the models with the same tensor of the others. A
`slices:` config (mergekit's) builds the output's layers slice by slice: the j-th layer of a
slice is made from layer start + j of each of its sources, and output layers are numbered on
from slice to slice. The tensors outside the layers come from the first slice's sources when
they are embeddings and from the last slice's otherwise (final norm, output head), where
mergekit's architecture tables put them for Llama-like models. Each refusal names the config
field, the model and the layer or tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from mergeflow.checkpoint import Checkpoint
from mergeflow.compatibility import check_same_shapes, check_same_vocabulary
from mergeflow.config import MergeConfig
from mergeflow.config_models import ModelGroup
from mergeflow.errors import ConfigError, IncompatibleModelsError
from mergeflow.layer_names import is_input_embedding, layer_position, layer_stacks, renumbered, split_layer
from mergeflow.safetensors_io import TensorEntry
from mergeflow.task_vectors import task_vector_info


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: the base's and each expert's tensor it is made from (`sources`, one
    per entry of `group`), and its position `t` on the layer gradients. It takes `reference`'s
    shape, and a tensor that is not float is copied from `reference`."""

    name: str
    reference: TensorEntry
    base: TensorEntry | None
    sources: list[TensorEntry]
    deltas: list[bool]  # which sources are task vectors (the base is added back)
    group: ModelGroup
    t: float


class _LayerSource(NamedTuple):
    """A model whose layers from `start` on go into a slice, and where the config names it."""

    where: str
    model: Checkpoint
    start: int


@dataclass(frozen=True)
class Layout:
    tensors: list[OutputTensor]
    # Per output layer, the model and layer it comes from (slices only): config.json's lists
    # with a value per layer follow them.
    layers: list[tuple[Checkpoint, int]] | None = None


def whole_model_layout(
    config: MergeConfig, base: Checkpoint | None, experts: dict[str, Checkpoint], reference: Checkpoint
) -> Layout:
    """Each tensor of the reference from the same tensor of every model (check_compatible has
    checked that they all have it). A base is read for every method: task vector inputs need it
    added back."""
    [group] = config.groups()
    models = [experts[entry.model] for entry in group.entries]
    deltas = [task_vector_info(c) is not None for c in models]
    stacks = layer_stacks(reference.tensors, reference.config)
    return Layout(
        [
            OutputTensor(
                name,
                entry,
                base.tensors[name] if base else None,
                [c.tensors[name] for c in models],
                deltas,
                group,
                layer_position(name, stacks),
            )
            for name, entry in reference.tensors.items()
        ]
    )


def sliced_layout(
    config: MergeConfig, base: Checkpoint | None, experts: dict[str, Checkpoint], reference: Checkpoint
) -> Layout:
    """The output's layers slice by slice, between the first slice's embeddings and the last
    slice's other tensors outside the layers. Each slice's base is base_model or its own."""
    groups = config.groups()
    bases = [group_base(config, g, base, experts) for g in groups]
    merged = [experts[e.model] for g in groups for e in g.entries]
    check_same_vocabulary(reference, merged + [b for b in bases if b is not None])
    outside = [name for name in reference.tensors if split_layer(name) is None]
    embeddings = [name for name in outside if is_input_embedding(name)]
    tensors = _outside_layers(embeddings, groups[0], bases[0], experts)
    layers: list[tuple[Checkpoint, int]] = []
    by_layer: dict[int, dict[int, dict[str, str]]] = {}

    def layer(checkpoint: Checkpoint, index: int) -> dict[str, str]:
        if id(checkpoint) not in by_layer:
            by_layer[id(checkpoint)] = _tensors_by_layer(checkpoint)
        return by_layer[id(checkpoint)].get(index, {})

    for group, slice_base in zip(groups, bases, strict=True):
        models = [experts[entry.model] for entry in group.entries]
        _check_ranges(group, models, slice_base)
        deltas = [task_vector_info(c) is not None for c in models]
        for i, delta in enumerate(deltas):
            if delta and group.base not in (None, config.base_model):
                raise ConfigError(
                    f"{group.entry_field(i)}: '{models[i].ref}' is a task vector of base_model, but "
                    f"{group.base_key} gives this slice another base; merge the expert itself"
                )
            if delta and group.layer_ranges[i] != group.base_range:
                raise ConfigError(
                    f"{group.entry_field(i)}: '{models[i].ref}' is a task vector, so it takes the "
                    f"base's layers: give it the base's layer_range {list(group.base_range or ())}"
                )
        owners = [
            _LayerSource(f"{group.entry_field(i)} ('{c.ref}')", c, r[0])
            for i, (c, r) in enumerate(zip(models, group.layer_ranges, strict=True))
        ]
        if slice_base is not None:
            owners.append(
                _LayerSource(f"{group.base_field()} ('{slice_base.ref}')", slice_base, group.base_range[0])
            )
        length = group.layer_ranges[0][1] - group.layer_ranges[0][0]
        for j in range(length):
            # mergekit's gradient position within a slice; a one-layer slice sits at its end
            t = j / (length - 1) if length > 1 else 1.0
            found = [layer(o.model, o.start + j) for o in owners]
            _check_same_tensors(found, owners, j)
            for suffix, first in found[0].items():
                # named by the model's tensor table, as the reference names it (name_prefix)
                name = renumbered(first, len(layers))
                entries = [o.model.tensors[names[suffix]] for o, names in zip(owners, found, strict=True)]
                check_same_shapes(name, entries, [o.model for o in owners])
                base_entry = entries[len(models)] if slice_base is not None else None
                tensors.append(
                    OutputTensor(name, entries[0], base_entry, entries[: len(models)], deltas, group, t)
                )
            layers.append((models[0], owners[0].start + j))
    tensors += _outside_layers([n for n in outside if n not in embeddings], groups[-1], bases[-1], experts)
    return Layout(tensors, layers)


def group_base(
    config: MergeConfig, group: ModelGroup, base: Checkpoint | None, experts: dict[str, Checkpoint]
) -> Checkpoint | None:
    """The checkpoint taking the base's part in `group`: base_model's, a slice's own, or None
    for a method without a base."""
    if group.base is None:
        return None
    return base if group.base == config.base_model else experts[group.base]


def _outside_layers(
    names: list[str], group: ModelGroup, base: Checkpoint | None, experts: dict[str, Checkpoint]
) -> list[OutputTensor]:
    models = [experts[entry.model] for entry in group.entries]
    deltas = [task_vector_info(c) is not None for c in models]
    tensors = []
    for name in names:
        for i, model in enumerate(models):
            if name not in model.tensors:
                raise IncompatibleModelsError(
                    f"{group.entry_field(i)} ('{model.ref}'): has no tensor '{name}'"
                )
        if base is not None and name not in base.tensors:
            raise IncompatibleModelsError(f"{group.base_key} '{base.ref}': has no tensor '{name}'")
        found = [model.tensors[name] for model in models]
        base_entry = base.tensors[name] if base else None
        check_same_shapes(
            name, [*found, *([base_entry] if base_entry else [])], [*models, *([base] if base else [])]
        )
        tensors.append(OutputTensor(name, found[0], base_entry, found, deltas, group, 0.0))
    return tensors


def _check_ranges(group: ModelGroup, models: list[Checkpoint], base: Checkpoint | None) -> None:
    """Every layer range lies within its model's layers."""
    checks = list(
        zip(models, group.layer_ranges, [group.entry_field(i) for i in range(len(models))], strict=True)
    )
    if base is not None and group.base_range is not None:
        checks.append((base, group.base_range, group.base_field()))
    for model, (start, end), where in checks:
        layers = _layers_of_its_one_stack(model, where)
        if end > layers:
            raise ConfigError(
                f"{where}: layer_range [{start}, {end}] reaches past the last layer of '{model.ref}', "
                f"which has {layers} layers (0 to {layers - 1})"
            )


def _layers_of_its_one_stack(model: Checkpoint, where: str) -> int:
    """The number of layers of a model to slice. A model with more than one stack of layers (a
    vision tower beside the decoder) is refused: which of them would a slice take?"""
    stacks = layer_stacks(model.tensors, model.config)
    if not stacks:
        raise ConfigError(
            f"{where} ('{model.ref}'): none of its tensor names numbers a layer ('layers.<i>.', "
            "'h.<i>.', 'layer.<i>.', 'block.<i>.'), so mergeflow cannot tell its layers apart to slice them"
        )
    if len(stacks) > 1:
        named = ", ".join(f"'{stack.lstrip('.')}'" for stack in sorted(stacks))
        raise ConfigError(
            f"{where} ('{model.ref}'): its layers are numbered under more than one name ({named}); "
            "mergeflow slices models with one stack of layers"
        )
    [layers] = stacks.values()
    return layers


def _tensors_by_layer(checkpoint: Checkpoint) -> dict[int, dict[str, str]]:
    """A model's layer tensors (of its one stack): by layer, then by their name after the
    layer number, to their name in its tensor table."""
    layers: dict[int, dict[str, str]] = {}
    for name in checkpoint.tensors:
        if (layer := split_layer(name)) is not None:
            _, index, rest = layer
            layers.setdefault(index, {})[rest] = name
    return layers


def _check_same_tensors(found: list[dict[str, str]], owners: list[_LayerSource], j: int) -> None:
    """The layers merged into one (the j-th of each owner's range) have the same tensors."""
    first_where, _, first_start = owners[0]
    for layer, (where, _, start) in zip(found[1:], owners[1:], strict=True):
        for differing, theirs, ours in (
            (set(found[0]) - set(layer), "lacks", "has"),
            (set(layer) - set(found[0]), "has", "lacks"),
        ):
            if differing:
                raise IncompatibleModelsError(
                    f"{where}: layer {start + j} {theirs} '{sorted(differing)[0]}', which layer "
                    f"{first_start + j} of {first_where} {ours}"
                )
