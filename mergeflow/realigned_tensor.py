"""A vocabulary tensor (rows by token: the embeddings, the output head) realigned to the
output's vocabulary (mergeflow.vocabulary) as the merge reads it, nothing written.

Each output token's row is the model's row of the same token. A token the model lacks (or
every model, where the config's `tokenizer.tokens` forces it) takes the row those `tokens` give
for it, else, as in mergekit, the row of the only model that has it, else the base's, else the
mean of the rows of the models that have it (zero where none has it); that mean is summed in model order,
rounded to the models' common dtype after each step, as torch sums mergekit's rows. Rows past
the tokenizer's last token (`pad_to_multiple_of`) are the mean of the model's realigned rows,
computed in float64 (torch's mean of bfloat16 rows may differ in the last bit).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mergeflow.checkpoint import Checkpoint
from mergeflow.errors import IncompatibleModelsError
from mergeflow.methods.primitives import from_float32, to_float32
from mergeflow.safetensors_io import DTYPES, ComputedTensor, DType, TensorEntry, TensorFileReader
from mergeflow.vocabulary import OutputVocabulary, vocab_size

log = logging.getLogger(__name__)

# The names mergekit's architectures give tensors with a vocabulary axis (always their first):
# a tensor is one when its name ends so and its first dimension is the model's vocab_size.
VOCABULARY_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|lm_head|lm_head\.linear|lm_head\.decoder|wte|word_embeddings|embed_in|"
    r"embed_out|shared|tok_embeddings|output|output_layer|vocab_projector|embeddings|"
    r"cls\.predictions|cls\.predictions\.decoder)\.(weight|bias)$"
)
# Rows read at once to compute a pad row's mean, or the rows that filled tokens take.
BLOCK_ROWS = 1024
# Rows of a model read together when they lie at most this far apart: a read from S3 is a
# request, so a few larger ones beat many small ones; at most this much more is read per gap.
SPAN_GAP_BYTES = 256 << 10


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds arrays
class RealignedTensor(ComputedTensor):
    """A vocabulary tensor of model `ref` with its rows in the output vocabulary's order,
    read (TensorFileReader.read hands such reads here) from the model's tensor, a run of
    consecutive rows at a time, and from `filled`: the rows it lacks, computed when it opened."""

    ref: str
    model: TensorEntry | ComputedTensor  # the model's own tensor, or its adapted one
    shape: tuple[int, ...]
    row_sources: np.ndarray  # per output row: the model's row, or -1 where `filled` has it
    fill_index: np.ndarray  # per output row: its row of `filled`, or -1
    filled: np.ndarray  # (rows, token_row) in the model's storage dtype

    def read(
        self, reader: TensorFileReader, start: int, count: int, into: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, start+count) in the model's storage dtype, as TensorFileReader.read
        gives a stored tensor's."""
        values = self.output(count, into)
        cols = token_row(self.shape)
        first, last = start // cols, -(-(start + count) // cols)
        block = np.empty((last - first, cols), dtype=self.dtype.storage)
        sources = self.row_sources[first:last]
        own = np.flatnonzero(sources >= 0)
        for taken, rows in read_rows(reader, self.model, cols, sources[own]):
            block[own[taken]] = rows
        fills = self.fill_index[first:last]
        where = np.flatnonzero(fills >= 0)
        block[where] = self.filled[fills[where]]
        offset = start - first * cols
        values[:] = block.reshape(-1)[offset : offset + count]
        return values


def read_rows(
    reader: TensorFileReader, entry: TensorEntry | ComputedTensor, cols: int, rows: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows `rows` (in any order) of a vocabulary tensor as stored, read in spans of rows near
    each other: (positions in `rows`, those rows) per span."""
    gap = max(1, SPAN_GAP_BYTES // (cols * entry.dtype.itemsize))
    for low, high, taken in row_spans(rows, gap):
        block = reader.read(entry, low * cols, (high - low) * cols).reshape(high - low, cols)
        yield taken, block[rows[taken] - low]


def row_spans(rows: np.ndarray, gap: int) -> list[tuple[int, int, np.ndarray]]:
    """The model rows `rows` (in any order) as spans [low, high) to read, each with the
    positions in `rows` it serves: rows less than `gap` apart share a span, so a vocabulary in
    another order than the model's costs a few reads (from S3, requests), not one per row."""
    if rows.size == 0:
        return []
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    breaks = np.flatnonzero(np.diff(ordered) > gap) + 1
    return [
        (int(ordered[part[0]]), int(ordered[part[-1]]) + 1, order[part])
        for part in np.split(np.arange(ordered.size), breaks)
    ]


def token_row(shape: tuple[int, ...]) -> int:
    """Elements per token of a vocabulary tensor (1 for a bias)."""
    return math.prod(shape[1:])


def vocabulary_tensors(model: Checkpoint) -> list[str]:
    size = vocab_size(model)
    return [
        name
        for name, entry in model.tensors.items()
        if VOCABULARY_TENSOR.search(name) and entry.shape and entry.shape[0] == size
    ]


def realign(
    models: list[Checkpoint], vocabulary: OutputVocabulary, base_of: Callable[[str], Checkpoint | None]
) -> None:
    """Replace each model's vocabulary tensors (those of models[0], the base or first model)
    with RealignedTensor entries, and set its vocab_size to the output's rows. `base_of` a
    tensor is the model whose row a token the others share takes (mergekit's base)."""
    reader = TensorFileReader()
    try:
        for name in vocabulary_tensors(models[0]):
            holders = [i for i, m in enumerate(models) if name in m.tensors]
            _realign_tensor(name, models, holders, vocabulary, base_of(name), reader)
    finally:
        reader.close()
    for model in models:
        model.config = dict(model.config or {}) | {"vocab_size": vocabulary.rows}


def _realign_tensor(
    name: str,
    models: list[Checkpoint],
    holders: list[int],
    vocabulary: OutputVocabulary,
    base: Checkpoint | None,
    reader: TensorFileReader,
) -> None:
    entries = [models[i].tensors[name] for i in holders]
    for i, entry in zip(holders, entries, strict=True):
        if entry.shape[0] != vocab_size(models[i]):
            raise IncompatibleModelsError(
                f"tensor '{name}': {entry.shape[0]} rows in '{models[i].ref}', whose vocab_size is "
                f"{vocab_size(models[i])}: its rows cannot be matched to its tokens"
            )
        if entry.shape[1:] != entries[0].shape[1:]:
            raise IncompatibleModelsError(
                f"tensor '{name}': shape {list(entry.shape)} in '{models[i].ref}' but "
                f"{list(entries[0].shape)} in '{models[holders[0]].ref}' (beyond the vocabulary axis)"
            )
    sources = np.stack([vocabulary.row_sources[i] for i in holders])  # (holders, tokens)
    present = sources >= 0
    common = _common_dtype([e.dtype for e in entries])
    base_at = next((k for k, i in enumerate(holders) if models[i] is base), None)
    cols = token_row(entries[0].shape)

    forced = np.zeros(vocabulary.tokens, dtype=bool)
    forced[[t for t, given in vocabulary.token_rows.items() if given.force]] = True
    filling = np.flatnonzero((present.sum(axis=0) < len(holders)) | forced)
    rows_read: dict[int, dict[int, np.ndarray]] = {}

    def row(k: int, token: int, own_row: int | None = None) -> np.ndarray:
        at = int(sources[k, token]) if own_row is None else own_row
        if k not in rows_read:  # every row of holder k the tokens filled may take, read in spans
            own = sources[k, filling][present[k, filling]]
            given = [
                t.row for t in vocabulary.token_rows.values() if t.model == holders[k] and t.row is not None
            ]
            rows_read[k] = _rows_by_number(
                reader, entries[k], cols, np.concatenate([own, np.array(given, np.int64)])
            )
        return _values(rows_read[k][at]).astype(_work(common))

    defaults: dict[int, np.ndarray] = {}
    for token in filling:
        have = np.flatnonzero(present[:, token])
        given = vocabulary.token_rows.get(token)
        if given is not None:  # the config's `tokens` say where its row comes from
            if given.model is None:
                defaults[token] = np.zeros(cols, dtype=_work(common))
            elif given.model not in holders:
                raise IncompatibleModelsError(
                    f"tensor '{name}': model '{models[given.model].ref}', which tokenizer.tokens names "
                    "as a source, does not have it"
                )
            else:
                defaults[token] = row(holders.index(given.model), token, given.row)
        elif have.size == 0:
            log.warning("tensor '%s': token id %d is in no model; its row is zero", name, token)
            defaults[token] = np.zeros(cols, dtype=_work(common))
        elif have.size == 1:
            defaults[token] = row(have[0], token)
        elif base_at is not None and present[base_at, token]:
            defaults[token] = row(base_at, token)
        else:
            total = np.zeros(cols, dtype=_work(common))
            for k in have:
                total = _rounded(total + row(k, token), common)
            defaults[token] = _rounded(total / _work(common)(have.size), common)

    shape = (vocabulary.rows, *entries[0].shape[1:])
    for k, i in enumerate(holders):
        model, entry = models[i], entries[k]
        lacking = np.flatnonzero(~present[k] | forced)
        fill_index = np.full(vocabulary.rows, -1, dtype=np.int64)
        fill_index[lacking] = np.arange(lacking.size)
        filled = np.empty((lacking.size + 1, cols), dtype=entry.dtype.storage)
        for at, token in enumerate(lacking):
            filled[at] = _stored(defaults[token], entry.dtype)
        row_sources = np.full(vocabulary.rows, -1, dtype=np.int64)
        row_sources[: vocabulary.tokens] = np.where(forced, -1, sources[k])
        realigned = RealignedTensor(model.ref, entry, shape, row_sources, fill_index, filled)
        if vocabulary.rows > vocabulary.tokens:  # pad rows: the mean of the realigned rows
            fill_index[vocabulary.tokens :] = lacking.size
            filled[lacking.size] = _stored(_mean_row(realigned, vocabulary.tokens, reader), entry.dtype)
        model.tensors[name] = realigned


def _rows_by_number(
    reader: TensorFileReader, entry: TensorEntry | ComputedTensor, cols: int, rows: np.ndarray
) -> dict[int, np.ndarray]:
    """Rows `rows` of a vocabulary tensor as stored, by row number, at most BLOCK_ROWS of them
    read at once."""
    wanted = np.unique(rows)
    found: dict[int, np.ndarray] = {}
    for first in range(0, wanted.size, BLOCK_ROWS):
        batch = wanted[first : first + BLOCK_ROWS]
        for taken, stored in read_rows(reader, entry, cols, batch):
            found.update(zip(batch[taken].tolist(), stored, strict=True))
    return found


def _mean_row(tensor: RealignedTensor, tokens: int, reader: TensorFileReader) -> np.ndarray:
    cols = token_row(tensor.shape)
    total = np.zeros(cols, dtype=np.float64)
    for first in range(0, tokens, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, tokens - first)
        block = _values(tensor.read(reader, first * cols, rows * cols)).reshape(rows, cols)
        total += block.sum(axis=0, dtype=np.float64)
    return total / tokens


def _values(stored: np.ndarray) -> np.ndarray:
    """Elements as stored, as float32, or float64 for a float64 tensor (exact either way)."""
    return stored if stored.dtype == np.float64 else to_float32(stored)


def _common_dtype(dtypes: list[DType]) -> DType:
    """torch's promotion of the models' float dtypes: the one they share, else float32 (or
    float64 where one is)."""
    if len({d.name for d in dtypes}) == 1:
        return dtypes[0]
    return DTYPES["F64"] if any(d.name == "F64" for d in dtypes) else DTYPES["F32"]


def _work(dtype: DType) -> type:
    """The float type arithmetic in `dtype` is done in (torch computes bfloat16 and float16 in
    float32, then rounds)."""
    return np.float64 if dtype.name == "F64" else np.float32


def _rounded(values: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype.name in ("BF16", "F16"):
        return to_float32(from_float32(values, dtype)[0])
    return values.astype(_work(dtype))


def _stored(values: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype.name in ("BF16", "F16"):
        return from_float32(values.astype(np.float32), dtype)[0]
    return values.astype(dtype.storage)
