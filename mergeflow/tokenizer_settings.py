"""mergekit's `tokenizer` block: where the output's vocabulary comes from (mergeflow.vocabulary
builds it) and, per token, where its rows come from."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, model_validator

from mergeflow.errors import ConfigError
from mergeflow.model_reference import ModelReference


class ModelTokenEmbedding(BaseModel):
    """A token's row taken from a model's row of a token given by id or by itself."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: ModelReference
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source gives token_id or token (one of them)")
        return self


class ZeroEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


def _token_source_kind(value: Any) -> str:
    """Which kind of token source `value` is: mergekit tells them apart by `kind`."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"kind={kind}" if kind is not None else "model reference"


TokenSource = Annotated[
    Annotated[ModelTokenEmbedding, Tag("kind=model_token")]
    | Annotated[ZeroEmbedding, Tag("kind=zero")]
    | Annotated[ModelReference, Tag("model reference")],
    Discriminator(
        _token_source_kind,
        custom_error_type="token_source",
        custom_error_message="a token source is a model, {kind: model_token, model, token or token_id} "
        "or {kind: zero}",
    ),
]


class TokenEmbedding(BaseModel):
    """Where the rows of one token come from (an entry of mergekit's `tokenizer.tokens`): a model
    (its row of that token), another token of a model, or zeros; for the models that lack the
    token, or with `force` for every model."""

    model_config = ConfigDict(extra="forbid")
    source: TokenSource
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's `tokenizer` block: the output's vocabulary comes from `source` (`base`,
    `union`, mergekit's default here, or a model; mergeflow.vocabulary) plus the `tokens` it
    lacks, with the rows `tokens` give, padded to `pad_to_multiple_of` rows."""

    model_config = ConfigDict(extra="forbid")
    source: ModelReference = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


def check_tokenizer_settings(source: str | None, block: TokenizerSettings | None) -> None:
    """What can be checked without the models: one of tokenizer_source and the block, and a
    positive pad_to_multiple_of (MergeConfig checks that token sources are merged models)."""
    if block is None:
        return
    if source is not None:
        raise ConfigError("tokenizer: give tokenizer_source or the tokenizer block, not both")
    if block.pad_to_multiple_of is not None and block.pad_to_multiple_of < 1:
        raise ConfigError(
            f"tokenizer.pad_to_multiple_of: must be a positive integer, got {block.pad_to_multiple_of}"
        )
