"""Merge configuration: mergekit's YAML, as users already write it, as a pydantic model.

Supported keys: merge_method, base_model, models[].model, models[].parameters, parameters,
dtype, out_dtype, tokenizer_source or the tokenizer block (mergeflow.tokenizer_settings),
chat_template ('auto', a named format or Jinja), and
slices[] (sources[] of model, layer_range, parameters; the slice's parameters and base_model):
the output's layers, slice by slice.
A parameter value is a number or flag, a list of numbers (a gradient interpolated over layers)
or a list of {filter, value} entries whose first entry with a filter contained in the tensor
name (or no filter) applies - mergekit's rules.
Relative model paths are resolved from the working directory, as mergekit does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from mergeflow.chat_template import NAMED_TEMPLATES
from mergeflow.config_models import LayerSlice, ModelEntry, ModelGroup, SliceSource
from mergeflow.errors import ConfigError
from mergeflow.methods import MergeMethod, get_method
from mergeflow.model_reference import ModelReference
from mergeflow.parameters import ConditionalParameter, Parameters, check_parameters, empty_when_null
from mergeflow.safetensors_io import DTYPES_BY_LONG_NAME, DType
from mergeflow.tokenizer_settings import (
    ModelTokenEmbedding,
    TokenEmbedding,
    TokenizerSettings,
    ZeroEmbedding,
    check_tokenizer_settings,
)


def _without_torch_prefix(value: Any) -> Any:
    return value.removeprefix("torch.") if isinstance(value, str) else value


# As mergekit reads them: also spelled as torch names (torch.bfloat16).
DTypeName = Annotated[Literal["float32", "float16", "bfloat16"], BeforeValidator(_without_torch_prefix)]


class MergeConfig(BaseModel):
    """A merge, as in a mergekit YAML file. Its models come under `models` (whole models merged
    tensor by tensor) or under `slices` (the output's layers slice by slice, each from a range
    of layers of its sources; layer ranges are checked against the models when they open)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: ModelReference | None = None
    models: Annotated[list[ModelEntry], empty_when_null(list)] = []
    slices: Annotated[list[LayerSlice], empty_when_null(list)] = []
    parameters: Parameters = {}
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: ModelReference | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def _base_of_group(self, own: str | None = None) -> str | None:
        """The model that takes part as the base of a group (a slice may give its `own`): for a
        method that needs one or may have one (models that repeat it are then not merged
        again as models)."""
        method = self.method
        return (own or self.base_model) if method.needs_base or method.optional_base else None

    def groups(self) -> list[ModelGroup]:
        """The models merged together: one group for `models`, one per slice."""
        if not self.slices:
            base = self._base_of_group()
            positions = [k for k, entry in enumerate(self.models) if entry.model != base]
            return [ModelGroup("models", positions, [self.models[k] for k in positions], base)]
        return [self._slice_group(s) for s in range(len(self.slices))]

    def experts(self) -> list[ModelEntry]:
        """Every model read besides base_model, once, in the order the config first names it
        (with the parameters given there): the models merged into a base, and the bases that
        slices give for their layers."""
        first: dict[str, ModelEntry | SliceSource] = {}
        for group in self.groups():
            for entry in group.entries:
                first.setdefault(entry.model, entry)
            if group.base is not None and group.base != self.base_model:
                first.setdefault(group.base, ModelEntry(model=group.base))
        return [ModelEntry(model=e.model, parameters=e.parameters) for e in first.values()]

    def _slice_group(self, s: int) -> ModelGroup:
        layer_slice = self.slices[s]
        sources = layer_slice.sources
        base = self._base_of_group(layer_slice.base_model)
        base_key = f"slices[{s}].base_model" if layer_slice.base_model else "base_model"
        positions = [k for k, source in enumerate(sources) if source.model != base]
        ranges = [sources[k].layer_range for k in positions]
        group = ModelGroup(
            f"slices[{s}].sources",
            positions,
            [sources[k] for k in positions],
            base,
            base_key,
            ranges,
            parameters=layer_slice.parameters,
        )
        if base is None:
            return group
        listed = next((k for k, source in enumerate(sources) if source.model == base), None)
        if listed is not None:
            return replace(group, base_range=sources[listed].layer_range, base_position=listed)
        if len(set(ranges)) > 1:
            raise ConfigError(
                f"slices[{s}].sources: {base_key} '{base}' is not among them and they take "
                "different layers; list the base with the layer_range to merge them into"
            )
        # One range for all: the base's same layers, as for models merged whole.
        return replace(group, base_range=ranges[0] if ranges else None)

    def output_dtype(self) -> DType | None:
        name = self.out_dtype or self.dtype
        return DTYPES_BY_LONG_NAME[name] if name else None

    def vocabulary_source(self) -> str | None:
        """mergekit's tokenizer source: 'base', 'union' or a model reference; None where the
        config names none (the models must then share a vocabulary)."""
        source = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        return source if source in (None, "base", "union") else source.removeprefix("model:")

    def tokenizer_reference(self) -> str | None:
        """The model the output's tokenizer is built on, when it is not the base (or first model)."""
        source = self.vocabulary_source()
        return None if source in (None, "base", "union") else source

    def token_sources(self) -> dict[str, TokenEmbedding]:
        return (self.tokenizer.tokens if self.tokenizer else None) or {}

    def _check_token_sources(self) -> None:
        """A token's source model is one of the merged models (its rows are read with theirs)."""
        merged = {entry.model for entry in self.experts()} | {self.base_model}
        for token, embedding in self.token_sources().items():
            source = embedding.source
            model = source if isinstance(source, str) else getattr(source, "model", None)
            if model is not None and model.removeprefix("model:") not in merged:
                raise ConfigError(
                    f"tokenizer.tokens.{token}.source: model '{model}' is not one of the merged models"
                )

    def _check_listed_once(self) -> None:
        """A model is listed once under `models` and once per slice, as mergekit requires: it
        would be merged twice (or, as a base, dropped from the sources the second time)."""
        whole = ("models", self.models, "give it a weight to count it more")
        sliced = [
            (f"slices[{s}].sources", one.sources, "a slice merges one layer range of each model")
            for s, one in enumerate(self.slices)
        ]
        for where, entries, hint in [whole, *sliced]:
            first: dict[str, int] = {}
            for k, entry in enumerate(entries):
                if entry.model in first:
                    raise ConfigError(
                        f"{where}[{k}]: '{entry.model}' is listed already, as {where}[{first[entry.model]}]; "
                        f"{hint}"
                    )
                first[entry.model] = k

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if self.slices and self.models:
            raise ConfigError("slices: list the models under `models` or under `slices`, not both")
        method = self.method
        if not self.slices and not self.models:
            raise ConfigError("models: no models to merge (zero experts)")
        self._check_listed_once()
        for group in self.groups():
            if method.needs_base and group.base is None:
                where = group.field.removesuffix(".sources") if self.slices else "base_model"
                also = " (give base_model, or the slice its own)" if self.slices else ""
                raise ConfigError(f"{where}: method '{method.name}' needs a base model{also}")
            count = len(group.entries)
            if count < method.min_models:
                raise ConfigError(
                    f"{group.field}: method '{method.name}' needs at least {method.min_models} models "
                    f"besides the base, got {count}"
                )
            if method.max_models is not None and count > method.max_models:
                raise ConfigError(
                    f"{group.field}: method '{method.name}' merges exactly {method.max_models} model(s) "
                    f"besides the base, got {count}"
                )
        check_tokenizer_settings(self.tokenizer_source, self.tokenizer)
        self._check_token_sources()
        named = ["auto", *NAMED_TEMPLATES]
        if self.chat_template not in (None, *named) and "{" not in self.chat_template:
            raise ConfigError(
                f"chat_template: {self.chat_template!r} is neither a Jinja template nor one of "
                f"{', '.join(named)}; give the template itself"
            )
        check_parameters(method, self.parameters, "parameters", per_model_only=False)
        if (  # mergekit adds the base to `models`, not to slices
            method.name == "average"
            and "weight" in self.parameters
            and self.base_model is not None
            and self.base_model not in [m.model for m in self.models]
            and not self.slices
        ):
            raise ConfigError(
                "parameters.weight: with a global weight, mergekit averages base_model too; "
                "mergeflow averages the models listed: list the base under models to average "
                "it, or give each model its weight"
            )
        entries = [(f"models[{k}]", e) for k, e in enumerate(self.models)] + [
            (f"slices[{s}].sources[{k}]", e)
            for s, one in enumerate(self.slices)
            for k, e in enumerate(one.sources)
        ]
        for where, entry in entries:
            check_parameters(method, entry.parameters, f"{where}.parameters", per_model_only=True)
        for s, one in enumerate(self.slices):
            check_parameters(method, one.parameters, f"slices[{s}].parameters", per_model_only=False)
        for param in method.params:
            given = param.name in self.parameters or (
                self.slices and all(param.name in one.parameters for one in self.slices)
            )
            if param.default is None and not given:
                raise ConfigError(f"parameters.{param.name}: required by method '{method.name}'")
        return self


# mergekit's per-module configs, for models of several modules (a vision tower, a projector and
# a decoder): which tensors make a module comes from its architecture tables
MODULES_REFUSAL = (
    "mergekit's per-module configs are not supported; `models:` merges every module with the same "
    "parameters (a gradient runs over each stack of layers on its own)"
)


def read_documents(path: str | Path) -> list:
    """The YAML documents of a config file: one per merge (mergekit-multi's files hold several)."""
    try:
        return list(yaml.safe_load_all(Path(path).read_text()))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc


def load_config(path: str | Path) -> MergeConfig:
    """Read a mergekit-style YAML file of one merge; every problem becomes one ConfigError line."""
    documents = read_documents(path)
    if len(documents) > 1:
        raise ConfigError(
            f"{path}: {len(documents)} YAML documents, as in a mergekit-multi file of several merges: "
            "run it with an intermediate folder for the named ones (mergeflow merge -I DIR, or "
            "mergeflow.multimerge)"
        )
    raw = documents[0] if documents else None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with merge_method, base_model, models")
    return parse_config(raw, source=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def parse_config(raw: dict, source: str = "config") -> MergeConfig:
    if "modules" in raw:
        raise ConfigError(f"{source}: modules: {MODULES_REFUSAL}")
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    # An unknown key says most: for a value that fits no type of a union, pydantic lists every
    # type's complaint, and the first is rarely the one the user meant.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(part) for part in error["loc"] if not _is_union_branch(part))
    if error["type"] == "extra_forbidden":
        supported = ", ".join(_fields_at(error["loc"]))
        return f"unknown key '{where}' (supported: {supported})"
    if error["type"] == "value_error":  # a field's own check names no field; the config's does
        return f"{where}: {error['ctx']['error']}" if where else str(error["ctx"]["error"])
    if error["type"] == "missing":
        return f"{where}: required"
    if error["type"] in ("model_type", "dict_type"):  # pydantic would name its class
        loc = error["loc"]
        entry = len(loc) >= 2 and loc[-2] in ("models", "sources") and isinstance(loc[-1], int)
        example = " such as {model: PATH}" if entry else ""
        hint = ""
        if loc == ("tokenizer",) and isinstance(error["input"], str):
            hint = f"; a source alone is tokenizer_source: {error['input']}"
        return f"{where}: expected a mapping{example}, got {_kind(error['input'])}{hint}"
    if "layer_range" in error["loc"]:
        return f"{where}: give [start, end), two whole numbers, got {_kind(error['input'])}"
    if error["type"] == "list_type":
        return f"{where}: expected a list, got {_kind(error['input'])}"
    return f"{where}: {error['msg']}"


def _kind(value: Any) -> str:
    """What a YAML value is, in words, with the value where it is short."""
    kinds = {
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a flag",
        list: "a list",
        dict: "a mapping",
    }
    shown = repr(value)
    return kinds.get(type(value), type(value).__name__) + (f" ({shown})" if len(shown) <= 60 else "")


def _fields_at(location: tuple) -> list[str]:
    """The keys allowed where an unknown key was found."""
    if len(location) == 1:
        return list(MergeConfig.model_fields)
    if any(isinstance(part, str) and "ConditionalParameter" in part for part in location):
        return list(ConditionalParameter.model_fields)
    if location[0] == "tokenizer":
        if "tokens" not in location[:-1]:
            return list(TokenizerSettings.model_fields)
        kinds = {"kind=model_token": ModelTokenEmbedding, "kind=zero": ZeroEmbedding}
        return list(next((kinds[p] for p in location if p in kinds), TokenEmbedding).model_fields)
    if location[0] != "slices":
        return list(ModelEntry.model_fields)
    return list(SliceSource.model_fields if "sources" in location[:-1] else LayerSlice.model_fields)


def _is_union_branch(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES)


_UNION_BRANCHES = (
    "str",
    "int",
    "float",
    "bool",
    "ConditionalParameter",
    "kind=model_token",
    "kind=zero",
    "model reference",
)
