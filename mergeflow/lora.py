"""mergekit's `model+adapter` references: a PEFT LoRA adapter applied to its model as the merge reads it.

mergekit loads the model and the adapter with PEFT and calls merge_and_unload, so the merged
model holds, for each adapted module, W' = W + s·B·A (transposed for fan_in_fan_out layers and
for embeddings), with s = lora_alpha / r, or lora_alpha / √r with use_rslora; `alpha_pattern`
and `rank_pattern` override alpha and r per module as PEFT matches them. Tensors the adapter
saves whole (modules_to_save, trained biases, a targeted embedding's base weights) replace the
model's. mergeflow computes the same tensor by tensor, without torch: B·A in float32, then
W + s·B·A rounded once to W's dtype, as PEFT adds its float32 delta into a bfloat16 weight
(for an embedding PEFT rounds s·B·A to W's dtype before adding; so does mergeflow). Nothing is
written: an adapted tensor is computed as the merge reads it (mergeflow.adapted_tensor), the
others are read from the model's own files. DoRA, LoRA biases and other adapter types are
refused by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mergeflow.checkpoint import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, read_json
from mergeflow.errors import CheckpointError, StorageError
from mergeflow.safetensors_io import TensorEntry, read_header
from mergeflow.storage import Location

PEFT_PREFIX = "base_model.model."
# adapter tensor name suffix -> (factor, whether it is an embedding's)
_FACTORS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
# Settings that would change the merged weights in ways this module does not compute.
_REFUSED_SETTINGS = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer_replication (it adds layers)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


def split_adapter_reference(ref: str) -> tuple[str, str]:
    """(model, adapter) of mergekit's 'model+adapter' form."""
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"model '{ref}': write a model with an adapter as 'MODEL+ADAPTER' (one '+')")
    return parts[0], parts[1]


@dataclass(frozen=True)
class TensorUpdate:
    """What the adapter does to one model tensor: replace it, add s·B·A, or both (in that order)."""

    target: str
    replacement: TensorEntry | None = None
    a: TensorEntry | None = None
    b: TensorEntry | None = None
    scale: float = 0.0
    transposed: bool = False  # s·(B·A)ᵀ: a fan_in_fan_out layer's, or an embedding's
    embedding: bool = False  # PEFT rounds an embedding's delta to the weight's dtype first


def adapter_files(where: str, adapter: Location) -> tuple[Location, Location]:
    """The adapter folder's adapter_config.json and weights: adapter_model.safetensors, else the
    pickle older PEFT versions wrote (adapter_model.bin; the caller converts it, if allowed).
    `where` names the model and adapter in errors."""
    try:
        if not adapter.is_dir():
            raise CheckpointError(
                f"{where}: not found or not a folder (give a local path, file:// or s3:// URI of a "
                "PEFT adapter folder, or the repo id of one in the local Hugging Face cache)"
            )
        names = adapter.list_names()
    except StorageError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    weights = next((name for name in (ADAPTER_WEIGHTS, ADAPTER_PICKLE) if name in names), None)
    if ADAPTER_CONFIG not in names or weights is None:
        raise CheckpointError(
            f"{where}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    return adapter.child(ADAPTER_CONFIG), adapter.child(weights)


def read_adapter(
    where: str, config: Location, weights: Location, tensors: dict[str, TensorEntry]
) -> list[TensorUpdate]:
    """The updates a PEFT LoRA adapter (its `config` file and safetensors `weights`; `where`
    names the model and adapter in errors) makes to a model with `tensors`, checked against
    them (names and shapes) before any tensor is read."""
    settings = _adapter_settings(where, config)
    factors: dict[str, dict[str, TensorEntry]] = {}  # module -> {"A": entry, "B": entry}
    embeddings: set[str] = set()
    replacements: dict[str, TensorEntry] = {}
    for entry in read_header(weights):
        module, factor, embedding = _parse_adapter_tensor(where, entry.name)
        if not entry.dtype.is_float:
            raise CheckpointError(f"{where}: tensor '{entry.name}' is {entry.dtype}, not a float")
        if factor is None:
            replacements[module] = entry
        else:
            factors.setdefault(module, {})[factor] = entry
            if embedding:
                embeddings.add(module)
    updates = {}
    for module, entry in replacements.items():
        target = _target(where, module, tensors, entry.shape, entry.name)
        updates[target] = TensorUpdate(target, replacement=entry)
    for module, pair in factors.items():
        if "A" not in pair or "B" not in pair:
            raise CheckpointError(f"{where}: module '{module}' has only one of its two LoRA factors")
        a, b, embedding = pair["A"], pair["B"], module in embeddings
        r, alpha = _rank_and_alpha(where, settings, module)
        if r < 1 or len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(
                f"{where}: module '{module}': factors of shapes {list(b.shape)} and {list(a.shape)} "
                f"do not have the rank r={r} the adapter config gives it"
            )
        transposed = embedding or bool(settings.get("fan_in_fan_out"))
        shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        target = _target(where, f"{module}.weight", tensors, shape, a.name)
        scale = alpha / math.sqrt(r) if settings.get("use_rslora") else alpha / r
        replaced = updates.get(target, TensorUpdate(target)).replacement
        updates[target] = TensorUpdate(target, replaced, a, b, scale, transposed, embedding)
    if not updates:
        raise CheckpointError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    return sorted(updates.values(), key=lambda u: u.target)


def _adapter_settings(where: str, file: Location) -> dict:
    settings = read_json(file, where)
    if not isinstance(settings, dict) or settings.get("peft_type") != "LORA":
        kind = settings.get("peft_type") if isinstance(settings, dict) else None
        raise CheckpointError(f"{where}: peft_type {kind!r} is not supported (only LORA adapters)")
    for key, what in _REFUSED_SETTINGS.items():
        if settings.get(key):
            raise CheckpointError(f"{where}: {what} are not supported ({ADAPTER_CONFIG} sets {key})")
    for key in ("r", "lora_alpha"):
        if not isinstance(settings.get(key), int | float) or not settings[key] > 0:
            raise CheckpointError(f"{where}: {ADAPTER_CONFIG} needs a positive number for '{key}'")
    return settings


def _parse_adapter_tensor(where: str, name: str) -> tuple[str, str | None, bool]:
    """(module or tensor name in the model, LoRA factor A/B or None for a saved whole tensor,
    whether the factor is an embedding's)."""
    if not name.startswith(PEFT_PREFIX):
        raise CheckpointError(
            f"{where}: tensor '{name}' is not named as PEFT saves adapters ({PEFT_PREFIX}…)"
        )
    inner = name.removeprefix(PEFT_PREFIX)
    for suffix, (factor, embedding) in _FACTORS.items():
        if inner.endswith(suffix):
            return inner.removesuffix(suffix), factor, embedding
    if inner.endswith((".weight", ".bias")) and ".lora_" not in inner:
        return inner.replace(".base_layer.", "."), None, False
    raise CheckpointError(
        f"{where}: tensor '{name}' is not a LoRA factor or a saved module (unsupported adapter)"
    )


def _rank_and_alpha(where: str, settings: dict, module: str) -> tuple[int, float]:
    """r and alpha of one module: rank_pattern and alpha_pattern keys match the end of the
    module name at a '.' boundary, first key first, as PEFT matches them."""

    def lookup(field: str, default):
        for pattern, value in (settings.get(field) or {}).items():
            try:
                matched = re.match(rf"(.*\.)?({pattern})$", module)
            except re.error as exc:
                raise CheckpointError(
                    f"{where}: {field} key '{pattern}' is not a regular expression: {exc}"
                ) from None
            if matched:
                return value
        return default

    return int(lookup("rank_pattern", settings["r"])), float(lookup("alpha_pattern", settings["lora_alpha"]))


def _target(
    where: str, name: str, tensors: dict[str, TensorEntry], shape: tuple[int, ...], source: str
) -> str:
    if name not in tensors:
        raise CheckpointError(f"{where}: '{source}' changes tensor '{name}', which the model does not have")
    if not tensors[name].dtype.is_float:
        raise CheckpointError(
            f"{where}: '{source}' changes tensor '{name}', which is {tensors[name].dtype}, not a float"
        )
    if tuple(tensors[name].shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: '{source}' gives tensor '{name}' shape {list(shape)}, the model's is "
            f"{list(tensors[name].shape)}"
        )
    return name
