"""mergekit's `model+adapter` references: a PEFT LoRA adapter applied to its model as the merge reads it.

mergekit loads the model and the adapter with PEFT and calls merge_and_unload, so the merged
model holds, for each adapted module, W' = W + s·B·A (transposed for fan_in_fan_out layers and
for embeddings), with s = lora_alpha / r, or lora_alpha / √r with use_rslora; `alpha_pattern`
and `rank_pattern` override alpha and r per module as PEFT matches them. Tensors the adapter
saves whole (modules_to_save, trained biases, a targeted embedding's base weights) replace the
model's. mergeflow computes the same tensor by tensor, without torch: B·A in float32, then
W + s·B·A rounded once to W's dtype, as PEFT adds its float32 delta into a bfloat16 weight
(for an embedding PEFT rounds s·B·A to W's dtype before adding; so does mergeflow). Nothing is
written: an adapted tensor is computed as the merge reads it (AdaptedTensor), the others are
read from the model's own files. DoRA, LoRA biases and other adapter types are refused by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from mergeflow.checkpoint import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, read_json
from mergeflow.errors import CheckpointError, NonFiniteError, StorageError
from mergeflow.methods.kernels import stored, widen
from mergeflow.methods.primitives import KERNEL_DTYPES, from_float32, to_float32
from mergeflow.safetensors_io import TensorEntry, TensorFileReader, read_header
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


@dataclass(frozen=True)
class AdaptedTensor:
    """A tensor of model `ref` with its adapter's update applied, computed whenever a range of
    it is read (TensorFileReader.read hands such reads here): nothing is written, and the
    product s·B·A is formed row block by row block, so memory stays at a few blocks however
    large the tensor. Each entry of B·A is summed in the order of the rank index, with fused
    multiply-adds, the way torch's product forms it: the same bits whichever rows are read
    together, and the same as PEFT's merge_and_unload."""

    ref: str
    model: TensorEntry  # the model's own tensor
    update: TensorUpdate

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.model.shape

    @property
    def numel(self) -> int:
        return self.model.numel

    @property
    def nbytes(self) -> int:
        return self.model.nbytes

    def read(
        self, reader: TensorFileReader, start: int, count: int, into: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, start+count) of the adapted tensor in its storage dtype, as
        TensorFileReader.read gives a stored tensor's. NaN or Inf in a result is refused here,
        naming the model and tensor."""
        nbytes = count * self.dtype.itemsize
        buffer = np.empty(nbytes, dtype=np.uint8) if into is None else into[:nbytes]
        values = buffer.view(self.dtype.storage)
        cols = max(1, self.shape[-1]) if len(self.shape) >= 2 else max(1, self.numel)  # one row's elements
        step = max(1, READ_BLOCK // cols) * cols  # whole rows per block
        position, end = start, start + count
        while position < end:
            stop = min(end, (position // step + 1) * step)
            self._block(reader, position, stop - position, cols, values[position - start : stop - start])
            position = stop
        return values

    def _block(self, reader: TensorFileReader, start: int, count: int, cols: int, out: np.ndarray) -> None:
        update, model = self.update, self.model
        stored = reader.read(update.replacement or model, start, count)
        with np.errstate(all="ignore"):  # NaN/Inf from bad factors: refused just below
            delta = self._delta(reader, start, count, cols) if update.a is not None else None
            if (
                delta is not None
                and update.replacement is None
                and not update.embedding
                and out.dtype in KERNEL_DTYPES
            ):
                non_finite = add_in_storage_(out, stored, delta)  # the usual case, in one pass
            else:
                weight = to_float32(stored)
                if update.replacement is not None:  # PEFT loads it into the model's weight: rounded
                    weight = _rounded(weight, model)
                if delta is not None:
                    weight += _rounded(delta, model) if update.embedding else delta
                out[:], non_finite = from_float32(weight, model.dtype)
        if non_finite:
            raise NonFiniteError(
                f"model '{self.ref}': tensor '{self.name}' holds {non_finite} NaN/Inf value(s) "
                "with the adapter applied"
            )

    def _delta(self, reader: TensorFileReader, start: int, count: int, cols: int) -> np.ndarray:
        """s·B·A (or its transpose) at elements [start, start+count), float32: the product's
        rows that hold them, from the rows of B (or the columns of A) they need."""
        update = self.update
        a, b = update.a, update.b
        first, last = start // cols, -(-(start + count) // cols)
        memo = reader.derived.setdefault(FactorMemo.KEY, FactorMemo())
        if update.transposed:  # rows of (B·A)ᵀ: columns first..last of A against all of B
            right = memo.factor(self, b, reader, transposed=True)
            whole = memo.factor(self, a, reader, transposed=True, optional=True)
            if whole is not None:
                left = whole[first:last]
            else:  # one read per rank: a column range of each row of A
                left = np.empty((last - first, a.shape[0]), dtype=np.float32)
                for k in range(a.shape[0]):
                    left[:, k] = to_float32(reader.read(a, k * a.shape[1] + first, last - first))
        else:  # rows first..last of B (one range) against all of A
            right = memo.factor(self, a, reader)
            rank = b.shape[1]
            left = to_float32(reader.read(b, first * rank, (last - first) * rank)).reshape(-1, rank)
        product = np.empty((last - first, cols), dtype=np.float32)
        scaled_product_in_rank_order_(left, right, np.float32(update.scale), product)
        offset = start - first * cols
        return product.reshape(-1)[offset : offset + count]


# Elements of an adapted tensor computed at once (whole rows, at least one): a few float32
# buffers of this size are what applying an adapter holds.
READ_BLOCK = 1 << 20


class FactorMemo:
    """LoRA factors in float32, whole, of the tensor being read (of every model that adapts
    it), so that each is read once per tensor rather than once per chunk (from S3, a request
    each). Up to MEMO_BYTES: the factors of one tensor are small (r rows or columns), but an
    embedding's A of a large vocabulary, times many experts, need not be. Forgotten when a read
    of another tensor begins."""

    KEY = "lora factors"  # its key in TensorFileReader.derived
    MEMO_BYTES = 64 << 20

    def __init__(self) -> None:
        self._tensor: str | None = None
        self._arrays: dict[tuple[TensorEntry, bool], np.ndarray] = {}
        self._bytes = 0

    def factor(
        self,
        tensor: AdaptedTensor,
        entry: TensorEntry,
        reader: TensorFileReader,
        transposed: bool = False,
        optional: bool = False,
    ) -> np.ndarray | None:
        """`entry` (a factor of `tensor`) in float32, as a contiguous 2-D array, transposed when
        asked; when `optional`, None instead of reading it whole where the memo has no room."""
        if tensor.name != self._tensor:
            self._tensor, self._arrays, self._bytes = tensor.name, {}, 0
        key = (entry, transposed)
        if key in self._arrays:
            return self._arrays[key]
        fits = self._bytes + 4 * entry.numel <= self.MEMO_BYTES
        if optional and not fits:
            return None
        array = to_float32(reader.read(entry, 0, entry.numel)).reshape(entry.shape)
        array = np.ascontiguousarray(array.T) if transposed else array
        if fits:
            self._arrays[key] = array
            self._bytes += array.nbytes
        return array


@njit(parallel=True, cache=True, fastmath={"contract"})
def scaled_product_in_rank_order_(left, right, scale, out):
    """out = (left · right) · scale, each entry of the product summed over the rank index k in
    order, one fused multiply-add per step, then multiplied by `scale` (PEFT's s·B·A: torch's
    CPU product gives the same bits for LoRA factors; numpy's BLAS changes its order with the
    number of rows). Four steps per pass over a row keep the partial sums in registers."""
    rows, rank = left.shape
    cols = out.shape[1]
    for i in prange(rows):
        row = out[i]
        k = 0
        if rank >= 4:
            x0, x1, x2, x3 = left[i, 0], left[i, 1], left[i, 2], left[i, 3]
            r0, r1, r2, r3 = right[0], right[1], right[2], right[3]
            for j in range(cols):
                row[j] = x3 * r3[j] + (x2 * r2[j] + (x1 * r1[j] + x0 * r0[j]))
            k = 4
        else:
            for j in range(cols):
                row[j] = 0.0
        while k + 4 <= rank:
            x0, x1, x2, x3 = left[i, k], left[i, k + 1], left[i, k + 2], left[i, k + 3]
            r0, r1, r2, r3 = right[k], right[k + 1], right[k + 2], right[k + 3]
            for j in range(cols):
                row[j] = x3 * r3[j] + (x2 * r2[j] + (x1 * r1[j] + (x0 * r0[j] + row[j])))
            k += 4
        while k < rank:
            x, r = left[i, k], right[k]
            for j in range(cols):
                row[j] += x * r[j]
            k += 1
        for j in range(cols):
            row[j] *= scale


@njit(parallel=True, cache=True)
def add_in_storage_(out, values, delta):
    """out = values + delta, computed in float32 and stored as `out` stores it (float32, or
    bfloat16 bit patterns: `values` too); returns how many results are NaN or ±Inf."""
    bad = 0
    for j in prange(out.size):
        x = widen(values[j]) + delta[j]
        bad += x - x != 0
        out[j] = stored(x, out)
    return bad


def adapted_tensors(ref: str, updates: list[TensorUpdate], tensors: dict[str, TensorEntry]) -> dict:
    """The model's `tensors` that `updates` change, as AdaptedTensor entries of model `ref`."""
    return {u.target: AdaptedTensor(ref, tensors[u.target], u) for u in updates}


def _rounded(values: np.ndarray, entry: TensorEntry) -> np.ndarray:
    """float32 `values` rounded to `entry`'s dtype, as float32 again."""
    return to_float32(from_float32(values, entry.dtype)[0])


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
