"""The models of a merge config: a whole model under `models` (ModelEntry), a model's layer
range in a slice (SliceSource), a slice (LayerSlice), and the models merged together with
their base (ModelGroup: all of `models`, or one slice)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from mergeflow.model_reference import ModelReference
from mergeflow.parameters import Parameters


class ModelEntry(BaseModel):
    """One input model: a local path, file:// or s3:// URI, with optional parameters."""

    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    parameters: Parameters = {}


class SliceSource(BaseModel):
    """One model of a mergekit slice, with the layers it contributes: [start, end), counted
    from 0 as mergekit does."""

    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: Parameters = {}

    @model_validator(mode="after")
    def _check_range(self) -> SliceSource:
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(
                f"layer_range [{start}, {end}] holds no layers: give [start, end) with 0 <= start < end"
            )
        return self


class LayerSlice(BaseModel):
    """Consecutive layers of the output, each made from the same layer of every source (the
    j-th layer of each source's range makes the slice's j-th layer)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    parameters: Parameters = {}  # between the sources' own and the global ones
    base_model: ModelReference | None = None  # the base of this slice's layers, for the global one

    @model_validator(mode="before")
    @classmethod
    def _refuse_residual_weight(cls, data: Any) -> Any:
        if isinstance(data, dict) and "residual_weight" in data:
            raise ValueError(
                "residual_weight: mergekit reads it but never applies it, so it would change "
                "nothing; leave it out"
            )
        return data

    @model_validator(mode="after")
    def _check_lengths(self) -> LayerSlice:
        if not self.sources:
            raise ValueError("sources: a slice needs at least one source")
        lengths = {end - start for start, end in (s.layer_range for s in self.sources)}
        if len(lengths) > 1:
            ranges = ", ".join(f"[{a}, {b}]" for a, b in (s.layer_range for s in self.sources))
            raise ValueError(
                f"the sources' layer ranges ({ranges}) differ in length; a slice merges layer for layer"
            )
        return self


@dataclass(frozen=True)
class ModelGroup:
    """Models merged together: the experts of `models`, or the sources of one slice less the
    base. `positions` are their places in `field`; `base` the model taking the base's part
    (None for a method without one) and `base_key` the key naming it; `layer_ranges` (slices
    only) the layers each gives, and `base_range` the base's; `parameters` the slice's own
    settings."""

    field: str
    positions: list[int]
    entries: list[ModelEntry | SliceSource]
    base: str | None = None
    base_key: str = "base_model"
    layer_ranges: list[tuple[int, int]] | None = None
    base_range: tuple[int, int] | None = None
    base_position: int | None = None  # where the slice lists the base, if it does
    parameters: dict = field(default_factory=dict)

    def entry_field(self, i: int) -> str:
        return f"{self.field}[{self.positions[i]}]"

    def base_field(self) -> str:
        """Where the base's layers for this group are given."""
        if self.base_position is None:
            return f"{self.base_key} (the layers of {self.field})"
        return f"{self.field}[{self.base_position}]"
