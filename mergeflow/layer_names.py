"""Where a tensor's name says which layer it belongs to, as mergekit's architecture tables do.

Architectures number their layers under a few names: `layers.<i>.` (Llama, Mistral, Qwen 2,
Gemma, Phi-3, GPT-NeoX, Mamba), `h.<i>.` (GPT-2, GPT-BigCode/StarCoder, Falcon, Qwen 1),
`layer.<i>.` (BERT, RoBERTa, DistilBERT) and `block.<i>.`/`blocks.<i>.` (T5, vision towers).
The first number so named is the layer: T5's `encoder.block.0.layer.1.` lies in block 0.

A stack is a name up to its layer number (`model.layers.`, `transformer.h.`). Most models have
one; an encoder-decoder or a model with a vision tower has two or more, each with its own
number of layers (mergekit's modules).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# config.json's number of layers, as the architectures call it (GPT-2 and StarCoder: n_layer;
# ChatGLM: num_layers)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

# Token and position embeddings outside the layers: `embed_tokens`, `word_embeddings`,
# `embed_in`, BERT's `embeddings.*`; GPT-2's `wte` and `wpe`. GPT-NeoX's head is `embed_out`.
_INPUT_EMBEDDING = re.compile(r"embed(?!_out)|(?:^|\.)(?:wte|wpe)\.")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(stack, layer number, the rest of the name) of a tensor in a layer, None for one outside
    the layers: ('model.layers.', 3, 'mlp.up_proj.weight')."""
    match = LAYER_PATTERN.search(name)
    return (name[: match.start(1)], int(match.group(1)), name[match.end() :]) if match else None


def renumbered(name: str, index: int) -> str:
    """The name of the same tensor in layer `index` of its stack."""
    match = LAYER_PATTERN.search(name)
    return f"{name[: match.start(1)]}{index}{name[match.end(1) :]}"


def layer_stacks(tensor_names: Iterable[str], config: dict | None) -> dict[str, int]:
    """Layers per stack, counted from the tensor names. A model with one stack takes its
    number from config.json when it gives one, as mergekit does (its gradients run over it)."""
    stacks: dict[str, int] = {}
    for name in tensor_names:
        if (layer := split_layer(name)) is not None:
            stack, index, _ = layer
            stacks[stack] = max(stacks.get(stack, 0), index + 1)
    configured = next((v for k in LAYER_COUNT_KEYS if isinstance(v := (config or {}).get(k), int)), None)
    if len(stacks) == 1 and configured is not None:
        return dict.fromkeys(stacks, configured)
    return stacks


def layer_position(name: str, stacks: dict[str, int]) -> float:
    """mergekit's gradient position t: layer i of a stack of L layers sits at i/(L-1) (a
    one-layer stack at 1); tensors outside the layers at 0."""
    layer = split_layer(name)
    if layer is None:
        return 0.0
    stack, index, _ = layer
    layers = stacks[stack]
    return index / (layers - 1) if layers > 1 else 1.0


def is_input_embedding(name: str) -> bool:
    """A tensor outside the layers that the first slice gives (the embeddings), not the last
    (the final norm, the output head)."""
    return _INPUT_EMBEDDING.search(name) is not None
