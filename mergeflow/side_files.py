"""The small files of a merged model beside its shards: config.json (dtype, vocab_size and,
for slices, the layers updated), generation config, tokenizer files and chat template."""

from __future__ import annotations

import json

from mergeflow.chat_template import with_chat_template
from mergeflow.checkpoint import Checkpoint
from mergeflow.layer_names import LAYER_COUNT_KEYS
from mergeflow.layout import Layout
from mergeflow.output import StagedOutput, WrittenFile, write_small_file

# config.json settings with a value per layer (transformers' attention kind of each layer)
PER_LAYER_SETTINGS = ("layer_types",)


def with_output_layers(config: dict, layers: list[tuple[Checkpoint, int]]) -> dict:
    """The config of a sliced output: its number of layers, and each per-layer setting as the
    model and layer each output layer comes from have it."""
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            config[key] = len(layers)
    for key in PER_LAYER_SETTINGS:
        if isinstance(config.get(key), list):
            config[key] = [(model.config or {}).get(key, config[key])[index] for model, index in layers]
    return config


def write_side_files(
    stage: StagedOutput,
    reference: Checkpoint,
    layout: Layout,
    tokenizer_files: list[tuple[str, bytes]],
    out_dtype,
    chat_template: str | None,
) -> list[WrittenFile]:
    """config.json (dtype, vocab_size and, for slices, the layers updated), generation config
    and tokenizer files (carrying `chat_template` when one is chosen)."""
    written = []
    if reference.config is not None:
        config = dict(reference.config)
        if layout.layers is not None:
            config = with_output_layers(config, layout.layers)
        if out_dtype is not None:
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = out_dtype.long_name
        written.append(("config.json", json.dumps(config, indent=2).encode()))
    if "generation_config.json" in reference.file_names:
        written.append(
            ("generation_config.json", reference.location.child("generation_config.json").read_bytes())
        )
    written += with_chat_template(tokenizer_files, chat_template) if chat_template else tokenizer_files
    return [write_small_file(stage.folder, name, data) for name, data in written]
