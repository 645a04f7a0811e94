"""mergekit's tokenizer merging: the output's vocabulary, from `tokenizer_source` (or the
`tokenizer` block's `source`): `base`, `union` or a model; and for each model, which of its
rows each output token takes.

The output's tokenizer is the tokenizer source's as it is (`base`: the base's, or the first
model's when there is no base). `union` adds to the base's tokenizer every token of the other
models it lacks, in the order of the models and, within a model, of the token ids; tokens a
model's tokenizer holds at ids beyond its vocab_size are left out, as in mergekit. Tokens the
`tokenizer` block's `tokens` name and the vocabulary lacks are added last.

Where every model already has the output's tokens at the same ids and the same number of rows
(experts of one base: the usual case), nothing is realigned and the rows are kept as they are
(mergekit would cut an embedding's rows past the tokenizer's last token). That is decided from
the tokenizer files' bytes before any tokenizer is parsed: transformers, which parses them,
loads only when they differ. Otherwise every vocabulary tensor is realigned to the output's
tokens (mergeflow.realigned_tensor), padded to `pad_to_multiple_of`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeflow.checkpoint import CONFIG, TOKENIZER_FILES, Checkpoint
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.tokenizer_settings import ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding

# The files that define a tokenizer's tokens and ids (its chat template aside).
VOCABULARY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class TokenRow:
    """Where the config's `tokenizer.tokens` puts one output token's row: the row `row` of
    model `model` (an index into the models), or zeros where `model` is None; for the models
    that lack the token, or with `force` for all."""

    model: int | None
    row: int | None
    force: bool


@dataclass(frozen=True)
class OutputVocabulary:
    """The output's vocabulary and where each model's rows go in it."""

    tokens: int  # the output tokenizer's tokens, ids 0..tokens-1
    rows: int  # rows of each vocabulary tensor: `tokens`, padded to pad_to_multiple_of
    # per model (in the order given): the model's row for each output token, -1 where it lacks it
    row_sources: list[np.ndarray]
    token_rows: dict[int, TokenRow]  # by output token id, from the config's `tokens`
    # the output's tokenizer files when tokens were added (by a union, or named by `tokens`);
    # else None: the tokenizer source's files, as they are
    tokenizer_files: list[tuple[str, bytes]] | None


def plan_vocabulary(
    source: str,
    models: list[Checkpoint],
    foundation: Checkpoint,
    tokenizer: Checkpoint,
    pad_to_multiple_of: int | None,
    token_sources: dict[str, TokenEmbedding] | None = None,
) -> OutputVocabulary | None:
    """The output vocabulary for `source` ('base', 'union' or a model: `tokenizer` is the
    checkpoint of the source) over `models` (the base first, when there is one), with the
    tokens `token_sources` name added where it lacks them; `foundation` is the base, or the
    first model. None when every model already has it row for row and nothing is forced."""
    token_sources = token_sources or {}
    if not _has_tokenizer(tokenizer):
        where = f"tokenizer source '{source}'" + (
            f": model '{tokenizer.ref}'" if tokenizer.ref != source else ""
        )
        raise ConfigError(f"{where} has no tokenizer files ({', '.join(VOCABULARY_FILES)})")
    rows = [vocab_size(m) for m in [tokenizer, *models]]
    padded_already = pad_to_multiple_of is None or (rows[1] or 1) % pad_to_multiple_of == 0
    distinct = {id(m): m for m in [foundation, tokenizer, *models]}
    files = {key: dict(tokenizer_files(m)) for key, m in distinct.items() if _has_tokenizer(m)}
    if (
        not token_sources
        and len(set(rows)) == 1
        and padded_already
        and _same_vocabulary_files([files[id(m)] for m in [tokenizer, *models] if id(m) in files])
    ):
        return None
    vocabularies = {key: _read_tokenizer(distinct[key], given) for key, given in files.items()}
    # As in mergekit, a model without tokenizer files has the foundation's vocabulary (or,
    # where the foundation has none either, the tokenizer source's).
    assumed = vocabularies.get(id(foundation), vocabularies[id(tokenizer)])
    for model in models:
        vocabularies.setdefault(id(model), assumed)
    _check_within_rows(foundation, vocabularies[id(foundation)].get_vocab())
    output = vocabularies[id(tokenizer)]
    added = False
    if source == "union":
        output, added = _union(vocabularies[id(foundation)], [(m, vocabularies[id(m)]) for m in models])
    named = [t for t in token_sources if t not in output.get_vocab()]
    if named:  # as mergekit: tokens the config names are added where the vocabulary lacks them
        output = output if added else _copy(output)
        output.add_tokens(named)
        added = True
    ids = output.get_vocab()
    tokens = len(ids)
    if sorted(ids.values()) != list(range(tokens)):
        raise CheckpointError(
            f"tokenizer source '{source}': the output tokenizer's ids are not 0..{tokens - 1}; "
            "mergeflow cannot lay out its embeddings"
        )
    for model, size in zip(models, rows[1:], strict=True):
        if size is None:
            raise CheckpointError(
                f"model '{model.ref}': its config.json gives no vocab_size, which realigning its "
                "embeddings to the output's vocabulary needs"
            )
    row_sources = [_rows_of(ids, vocabularies[id(m)].get_vocab(), vocab_size(m)) for m in models]
    token_rows = {
        ids[token]: _token_row(token, embedding, models, [vocabularies[id(m)] for m in models])
        for token, embedding in token_sources.items()
    }
    identity = np.arange(tokens)
    if (
        not any(t.force for t in token_rows.values())
        and all(np.array_equal(r, identity) for r in row_sources)
        and len(set(rows[1:])) == 1
        and (pad_to_multiple_of is None or rows[1] % pad_to_multiple_of == 0)
    ):
        return None  # every model has the output's tokens at its ids: rows kept as they are
    padded = tokens if pad_to_multiple_of is None else -(-tokens // pad_to_multiple_of) * pad_to_multiple_of
    return OutputVocabulary(tokens, padded, row_sources, token_rows, _saved(output) if added else None)


def _token_row(
    token: str, embedding: TokenEmbedding, models: list[Checkpoint], vocabularies: list
) -> TokenRow:
    """Where `tokenizer.tokens` puts `token`'s row, checked against the source model's
    vocabulary: the model's row of the token (or of the token or id a model_token source
    names), or zeros."""
    source = embedding.source
    if isinstance(source, ZeroEmbedding):
        return TokenRow(None, None, embedding.force)
    ref = (source if isinstance(source, str) else source.model).removeprefix("model:")
    where = f"tokenizer.tokens.{token}.source"
    index = next(k for k, m in enumerate(models) if m.ref == ref)
    size = vocab_size(models[index])
    if isinstance(source, ModelTokenEmbedding) and source.token_id is not None:
        row = source.token_id
    else:
        named = source.token if isinstance(source, ModelTokenEmbedding) else token
        row = vocabularies[index].get_vocab().get(named)
        if row is None:
            raise ConfigError(f"{where}: model '{ref}' has no token {named!r}")
    if not 0 <= row < size:
        raise ConfigError(f"{where}: row {row} is outside model '{ref}' (vocab_size {size})")
    return TokenRow(index, row, embedding.force)


def vocab_size(model: Checkpoint) -> int | None:
    size = (model.config or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def _has_tokenizer(model: Checkpoint) -> bool:
    return any(name in model.file_names for name in VOCABULARY_FILES)


def tokenizer_files(model: Checkpoint) -> list[tuple[str, bytes]]:
    """The model's tokenizer files (those it has of TOKENIZER_FILES), by name."""
    return [(n, model.location.child(n).read_bytes()) for n in TOKENIZER_FILES if n in model.file_names]


def _same_vocabulary_files(file_sets: list[dict[str, bytes]]) -> bool:
    """Whether the vocabulary files among the models' tokenizer files (of the models that have
    any: a model without has the foundation's, as in mergekit) are byte for byte the same."""
    vocabulary_files = [
        {n: data for n, data in files.items() if n in VOCABULARY_FILES} for files in file_sets
    ]
    return all(files == vocabulary_files[0] for files in vocabulary_files)


def _read_tokenizer(model: Checkpoint, given: dict[str, bytes]):
    """The model's tokenizer, loaded by transformers from a local copy of its tokenizer files
    (`given`), and of config.json where tokenizer_config.json names no tokenizer class
    (transformers then reads the model's config, which loads torch: 1.5 s). Never with remote
    code."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mergeflow-tokenizer-") as folder:
        files = dict(given)
        if b'"tokenizer_class"' not in files.get("tokenizer_config.json", b"") and CONFIG in model.file_names:
            files[CONFIG] = model.location.child(CONFIG).read_bytes()
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises many types for a tokenizer it cannot load
            raise CheckpointError(f"model '{model.ref}': cannot load its tokenizer: {exc}") from exc


def _check_within_rows(model: Checkpoint, ids: dict[str, int]) -> None:
    """The tokenizer the output builds on has no token past the model's vocab_size (mergekit
    strips such tokens from a BPE tokenizer; mergeflow does not rewrite tokenizers)."""
    size = vocab_size(model)
    beyond = sorted(t for t, i in ids.items() if size is not None and i >= size)
    if beyond:
        raise CheckpointError(
            f"model '{model.ref}': its tokenizer has {len(beyond)} token(s) at ids past its vocab_size "
            f"{size} (first {beyond[0]!r}); mergeflow does not strip tokenizers, so it cannot build "
            "the output's vocabulary on it"
        )


def _union(foundation, tokenizers: list) -> tuple[object, bool]:
    """The foundation's tokenizer with every token of the others' that it lacks added: their
    ordinary tokens first, then their added (special) tokens, each kept as first seen. Returns
    it and whether anything was added."""
    known = set(foundation.get_vocab())
    ordinary: dict[str, None] = {}
    added: dict = {}
    for model, tokenizer in tokenizers:
        size = vocab_size(model)
        decoder = tokenizer.added_tokens_decoder
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if size is not None and index >= size:
                continue
            if index in decoder:
                added.setdefault(token, decoder[index])
            elif token not in known:
                ordinary.setdefault(token, None)
    new_added = [info for token, info in added.items() if token not in known]
    new_ordinary = [t for t in ordinary if t not in added]
    if not new_added and not new_ordinary:
        return foundation, False
    union = _copy(foundation)
    union.add_tokens(new_ordinary)
    for info in new_added:
        union.add_tokens(info)
    return union, True


def _copy(tokenizer):
    """A tokenizer saved and loaded again, so adding tokens leaves the original as it was."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mergeflow-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)


def _saved(tokenizer) -> list[tuple[str, bytes]]:
    """The files transformers writes for `tokenizer`, by name."""
    with tempfile.TemporaryDirectory(prefix="mergeflow-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return sorted((p.name, p.read_bytes()) for p in Path(folder).iterdir() if p.is_file())


def _rows_of(output: dict[str, int], model: dict[str, int], size: int | None) -> np.ndarray:
    """For each output id, the model's id of the same token (-1 where the model lacks it, or
    has it past its vocab_size)."""
    rows = np.full(len(output), -1, dtype=np.int64)
    for token, index in output.items():
        own = model.get(token)
        if own is not None and (size is None or own < size):
            rows[index] = own
    return rows
