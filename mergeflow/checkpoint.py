"""Input models: find an HF checkpoint folder's weights, read its headers, check it."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.errors import CheckpointError, StorageError
from mergeflow.safetensors_io import (
    PlannedTensor,
    ShardFileWriter,
    TensorEntry,
    dtype_of,
    numpy_view,
    read_header,
)
from mergeflow.scratch import new_scratch_folder
from mergeflow.storage import Location, locate

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MANIFEST = "mergeflow-manifest.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Buffers that older transformers saved with the weights and that it recomputes and never
# loads: not weights, so a model that has them merges with one that does not.
RECOMPUTED_BUFFERS = (".rotary_emb.inv_freq",)
# A PEFT adapter folder's files (mergeflow.lora reads them).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
ADAPTER_PREFIX = "adapter/"  # how a model's hash names its adapter's files
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Checkpoint:
    """One model folder: its config, and where each tensor is stored."""

    ref: str
    location: Location
    config: dict | None
    tensors: dict[str, TensorEntry]  # or a ComputedTensor: adapted by LoRA, or realigned
    # The files the model's content hash is computed from, by the name its line gives them
    # (mergeflow.hashing): the weight files, or the pickles converted for this merge, and for
    # model+adapter the adapter's files too (as "adapter/<name>"), never the scratch files
    # derived from them.
    identity_files: dict[str, Location]
    file_names: list[str]
    hub_commit: str | None = None  # the snapshot's commit, for a repo id found in the hub cache
    # Files made for this merge: converted pickles. Gone on close.
    _scratch: Path | None = field(default=None, repr=False)

    def read_json(self, name: str) -> dict:
        return read_json(self.location.child(name), f"model '{self.ref}'")

    def scratch_folder(self) -> Path:
        """This checkpoint's scratch folder (mergeflow.scratch), made on first use."""
        if self._scratch is None:
            self._scratch = new_scratch_folder("checkpoint")
        return self._scratch

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def read_json(file: Location, where: str) -> dict:
    """A JSON file of a model folder; `where` names the model in the error when it is not JSON."""
    try:
        return json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: {file.name} is not valid JSON: {exc}") from exc


def open_checkpoint(ref: str, allow_pickle: bool = False) -> Checkpoint:
    """Locate a checkpoint, parse every shard header and check it; nothing heavy is read,
    except to convert pickles. `ref` is a local path, file:// or s3:// URI, or a Hugging Face
    repo id cached locally (hub_snapshot), or mergekit's MODEL+ADAPTER, whose adapter is read
    and checked against the model here and applied as its tensors are read (mergeflow.adapted_tensor)."""
    location, hub_commit = resolve(ref)
    try:
        if not location.is_dir():
            if "+" in ref:
                return _open_with_adapter(ref, allow_pickle)
            raise CheckpointError(
                f"model '{ref}': not found or not a folder (give a local path, file:// or s3:// URI "
                "of an HF checkpoint folder, or the repo id of a model in the local Hugging Face "
                f"cache, {_hub_cache()}; mergeflow never downloads from a hub)"
            )
        names = location.list_names()
    except StorageError as exc:
        raise CheckpointError(f"model '{ref}': {exc}") from exc
    if ADAPTER_CONFIG in names and CONFIG not in names:
        raise CheckpointError(
            f"model '{ref}': a LoRA adapter ({ADAPTER_CONFIG}), not a model: give it with the model it "
            f"adapts, as MODEL+{ref} (mergekit's model+adapter form)"
        )
    checkpoint = Checkpoint(ref, location, None, {}, {}, names, hub_commit)
    if CONFIG in names:
        checkpoint.config = checkpoint.read_json(CONFIG)
    weight_map = _weight_map(checkpoint) if INDEX in names else None
    files = (
        sorted(set(weight_map.values())) if weight_map else [n for n in names if n.endswith(".safetensors")]
    )
    if files:
        checkpoint.identity_files = {name: location.child(name) for name in files}
        weight_files = list(checkpoint.identity_files.values())
    else:  # the pickles are the identity files; the merge reads their converted tensors
        files = _convert_pickles(checkpoint, allow_pickle)
        weight_files = [locate(str(checkpoint.scratch_folder() / name)) for name in files]
    for file in weight_files:
        for entry in read_header(file):
            if entry.name in checkpoint.tensors:
                raise CheckpointError(f"model '{ref}': tensor '{entry.name}' appears in two shards")
            checkpoint.tensors[entry.name] = entry
    if weight_map:
        for tensor, shard in weight_map.items():
            entry = checkpoint.tensors.get(tensor)
            if entry is None or entry.file.name != shard:
                raise CheckpointError(
                    f"model '{ref}': {INDEX} puts tensor '{tensor}' in {shard}, which does not hold it"
                )
    for name in [n for n in checkpoint.tensors if n.endswith(RECOMPUTED_BUFFERS)]:
        del checkpoint.tensors[name]
    return checkpoint


def resolve(ref: str) -> tuple[Location, str | None]:
    """Where `ref` is, and the snapshot's commit when it is a repo id found in the local
    Hugging Face cache (a local path of that name wins)."""
    location = locate(ref)
    if location.is_local and not Path(location.path).exists() and (snapshot := hub_snapshot(ref)):
        return locate(snapshot), Path(snapshot).name
    return location, None


def _open_with_adapter(ref: str, allow_pickle: bool) -> Checkpoint:
    """The model of mergekit's 'model+adapter' form, with the LoRA adapter read and checked
    against it (mergeflow.lora). Config and tokenizer are the model's."""
    # Imported here: mergeflow.adapted_tensor loads numba, which reading checkpoints otherwise
    # does not need (and mergeflow.lora imports this module).
    from mergeflow.adapted_tensor import adapted_tensors
    from mergeflow.lora import adapter_files, read_adapter, split_adapter_reference

    model_ref, adapter_ref = split_adapter_reference(ref)
    where = f"model '{ref}': adapter '{adapter_ref}'"
    checkpoint = open_checkpoint(model_ref, allow_pickle)
    checkpoint.ref = ref
    try:
        config, weights = adapter_files(where, resolve(adapter_ref)[0])
        checkpoint.identity_files |= {ADAPTER_PREFIX + f.name: f for f in (config, weights)}
        if weights.name != ADAPTER_WEIGHTS:
            _refuse_pickle(where, [weights.name], allow_pickle)
            converted = checkpoint.scratch_folder() / ADAPTER_WEIGHTS
            _pickle_to_safetensors(where, weights, converted)
            weights = locate(str(converted))
        updates = read_adapter(where, config, weights, checkpoint.tensors)
        checkpoint.tensors |= adapted_tensors(ref, updates, checkpoint.tensors)
        return checkpoint
    except BaseException:
        checkpoint.close()
        raise


# How mergekit configs name a model on the Hugging Face hub: "org/name", "org/name@revision".
HUB_REPO_ID = re.compile(r"(?P<repo>[\w][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def hub_snapshot(ref: str) -> str | None:
    """The folder of repo id `ref`'s snapshot in the local Hugging Face cache (the revision
    named after "@", else main), or None when `ref` is no repo id or is not cached. Nothing is
    downloaded: users bring mergekit configs that name models by repo id, and fetch them with
    `hf download` first. huggingface_hub (0.13 s to import) loads only for such references."""
    match = HUB_REPO_ID.fullmatch(ref)
    if match is None:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(match["repo"], revision=match["revision"], local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _weight_map(checkpoint: Checkpoint) -> dict[str, str]:
    index = checkpoint.read_json(INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"model '{checkpoint.ref}': {INDEX} has no weight_map")
    for shard in set(weight_map.values()):
        if shard not in checkpoint.file_names:
            raise CheckpointError(f"model '{checkpoint.ref}': {INDEX} names shard {shard}, which is missing")
    return weight_map


def _convert_pickles(checkpoint: Checkpoint, allow_pickle: bool) -> list[str]:
    """A pickle-only checkpoint's weights as safetensors files in its scratch folder."""
    pickles = [n for n in checkpoint.file_names if n.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        gguf = [n for n in checkpoint.file_names if n.endswith(".gguf")]
        hint = (
            f" ({gguf[0]} is GGUF, which mergeflow does not read: convert it to safetensors, e.g. "
            "with transformers' from_pretrained(..., gguf_file=...) and save_pretrained)"
            if gguf
            else ""
        )
        raise CheckpointError(f"model '{checkpoint.ref}': no *.safetensors weights found{hint}")
    _refuse_pickle(f"model '{checkpoint.ref}'", pickles, allow_pickle)
    converted = []
    for name in pickles:
        target = f"{Path(name).stem}.safetensors"
        source = checkpoint.location.child(name)
        _pickle_to_safetensors(f"model '{checkpoint.ref}'", source, checkpoint.scratch_folder() / target)
        checkpoint.identity_files[name] = source
        converted.append(target)
    return converted


def _refuse_pickle(what: str, pickles: list[str], allow_pickle: bool) -> None:
    """Pickles are refused by default: unpickling can run arbitrary code."""
    if not allow_pickle:
        raise CheckpointError(
            f"{what}: only pickle weights ({', '.join(pickles)}); pickle can run code when "
            "loaded, so it is refused: convert to safetensors or pass --allow-pickle"
        )


def _pickle_to_safetensors(what: str, source: Location, target: Path) -> None:
    """Load a pickle with torch's weights-only unpickler and write its tensors to `target`."""
    import torch  # only for pickles: a merge of safetensors checkpoints never loads torch

    local = source.path if source.is_local else str(target.with_name(f"src-{source.name}"))
    if not source.is_local:
        Path(local).write_bytes(source.read_bytes())
    try:
        state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the unpickler raises many types; all mean "unreadable"
        raise CheckpointError(f"{what}: cannot load {source.name}: {exc}") from exc
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and dtype_of(v) is not None}
    planned = [PlannedTensor(k, dtype_of(v), tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardFileWriter(str(target), planned, hashed=False)
    for key, value in tensors.items():
        writer.write(key, numpy_view(value.reshape(-1)))
    writer.finish()
