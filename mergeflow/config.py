"""Merge configuration: mergekit's YAML, as users already write it, as a pydantic model.

Supported keys: merge_method, base_model, models[].model, models[].parameters, parameters,
dtype, out_dtype, tokenizer_source or the tokenizer block (its source; pad_to_multiple_of when
the vocabulary already is a multiple), chat_template ('auto', a named format or Jinja), and
slices[].sources[] (model, layer_range, parameters) for one slice spanning whole models.
A parameter value is a number or flag, a list of numbers (a gradient interpolated over layers)
or a list of {filter, value} entries whose first entry with a filter contained in the tensor
name (or no filter) applies - mergekit's rules.
Relative model paths are resolved from the working directory, as mergekit does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from mergeflow.chat_template import NAMED_TEMPLATES
from mergeflow.errors import ConfigError
from mergeflow.methods import MergeMethod, Param, get_method
from mergeflow.safetensors_io import DTYPES_BY_LONG_NAME, DType

Scalar = bool | int | float | str
DTypeName = Literal["float32", "float16", "bfloat16"]


class ConditionalParameter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | Scalar | list[Scalar]


def _empty_when_null(empty):
    """A key written with no value (`parameters:`) is empty, as mergekit reads it."""
    return BeforeValidator(lambda value: empty() if value is None else value)


Parameters = Annotated[dict[str, ParameterSetting], _empty_when_null(dict)]


def _model_reference(value: Any) -> Any:
    """mergekit's long form of a model reference, {model: {path, revision}, lora: {path,
    revision}} (each part may also be a string), as the short form it stands for:
    'path@revision+lora@revision'. mergekit writes the long form for paths with spaces."""
    if not isinstance(value, dict):
        return value
    if "override_architecture" in value:
        raise ValueError("override_architecture is not supported: mergeflow keeps the models' architecture")
    unknown = sorted(set(value) - {"model", "lora"})
    if unknown or "model" not in value:
        raise ValueError(f"a model given as a mapping has keys model and lora (got {sorted(value)})")
    ref = _model_path(value["model"])
    return f"{ref}+{_model_path(value['lora'])}" if value.get("lora") is not None else ref


def _model_path(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and isinstance(part.get("path"), str) and set(part) <= {"path", "revision"}:
        return part["path"] + (f"@{part['revision']}" if part.get("revision") else "")
    raise ValueError(f"a model path is a string or a mapping of path and revision (got {part!r})")


# A model as mergekit configs name it: a string, or its long form (see _model_reference).
ModelReference = Annotated[str, BeforeValidator(_model_reference)]


class ModelEntry(BaseModel):
    """One input model: a local path, file:// or s3:// URI, with optional parameters."""

    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    parameters: Parameters = {}


class SliceSource(BaseModel):
    """One model of a mergekit slice, with the layers it contributes."""

    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: Parameters = {}


class LayerSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]


class TokenizerSettings(BaseModel):
    """mergekit's `tokenizer` block. mergeflow merges models that share a vocabulary and copies
    one model's tokenizer files, so `source` may be `base` or a model; `union` (mergekit's
    default here) and per-token embedding `tokens` would build a new vocabulary and embeddings."""

    model_config = ConfigDict(extra="forbid")
    source: ModelReference = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class MergeConfig(BaseModel):
    """A merge, as in a mergekit YAML file. Its models come under `models`, or under `slices`
    as mergekit's slerp examples write them: one slice whose sources each span all of their
    model's layers (checked when the models are opened: mergeflow merges whole models)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: ModelReference | None = None
    models: Annotated[list[ModelEntry], _empty_when_null(list)] = []
    slices: Annotated[list[LayerSlice], _empty_when_null(list)] = []
    parameters: Parameters = {}
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: ModelReference | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def entries(self) -> list[ModelEntry]:
        """The models as listed, under `models` or as the sources of the one slice."""
        if self.slices:
            return [ModelEntry(model=s.model, parameters=s.parameters) for s in self.slices[0].sources]
        return list(self.models)

    def experts(self) -> list[ModelEntry]:
        """The models merged into the base: the entries minus those that repeat the base
        (mergekit configs often list the base among the models with no parameters)."""
        entries = self.entries()
        return [entries[k] for k in self._expert_positions()]

    def entries_field(self) -> str:
        """Where the config lists its models: `models`, or the sources of its one slice."""
        return "slices[0].sources" if self.slices else "models"

    def expert_field(self, i: int) -> str:
        """The config field of the i-th expert, e.g. models[2] when the base is listed first."""
        return f"{self.entries_field()}[{self._expert_positions()[i]}]"

    def _expert_positions(self) -> list[int]:
        return [
            k
            for k, entry in enumerate(self.entries())
            if not (self.method.needs_base or self.method.optional_base) or entry.model != self.base_model
        ]

    def layer_ranges(self) -> dict[str, tuple[int, int]]:
        """The layer range a slice gives each model (none without slices)."""
        return {s.model: s.layer_range for layer_slice in self.slices for s in layer_slice.sources}

    def output_dtype(self) -> DType | None:
        name = self.out_dtype or self.dtype
        return DTYPES_BY_LONG_NAME[name] if name else None

    def tokenizer_reference(self) -> str | None:
        """Where the tokenizer comes from: a model reference, or None for the base."""
        source = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if source in (None, "base"):
            return None
        return source.removeprefix("model:")

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if self.slices and self.models:
            raise ConfigError("slices: list the models under `models` or under `slices`, not both")
        if len(self.slices) > 1:
            raise ConfigError(
                f"slices: {len(self.slices)} slices; mergeflow merges whole models, so it takes one "
                "slice whose sources each span all of their model's layers"
            )
        method = self.method
        if method.needs_base and not self.base_model:
            raise ConfigError(f"base_model: method '{method.name}' needs a base model")
        experts = self.experts()
        if not experts:
            raise ConfigError("models: no models to merge (zero experts)")
        if len(experts) < method.min_models:
            raise ConfigError(
                f"models: method '{method.name}' needs at least {method.min_models} models "
                f"besides the base, got {len(experts)}"
            )
        if method.max_models is not None and len(experts) > method.max_models:
            raise ConfigError(
                f"models: method '{method.name}' merges exactly {method.max_models} model(s) "
                f"besides the base, got {len(experts)}"
            )
        _check_tokenizer(self.tokenizer_source, self.tokenizer)
        named = ["auto", *NAMED_TEMPLATES]
        if self.chat_template not in (None, *named) and "{" not in self.chat_template:
            raise ConfigError(
                f"chat_template: {self.chat_template!r} is neither a Jinja template nor one of "
                f"{', '.join(named)}; give the template itself"
            )
        _check_parameters(method, self.parameters, "parameters", per_model_only=False)
        base_unlisted = self.base_model and all(e.model != self.base_model for e in self.entries())
        if method.name == "average" and "weight" in self.parameters and base_unlisted:
            raise ConfigError(
                "parameters.weight: with a global weight, mergekit averages base_model too; "
                "mergeflow averages the models listed: list the base under models to average "
                "it, or give each model its weight"
            )
        where = self.entries_field()
        for i, entry in enumerate(self.entries()):
            _check_parameters(method, entry.parameters, f"{where}[{i}].parameters", per_model_only=True)
        for param in method.params:
            if param.default is None and param.name not in self.parameters:
                raise ConfigError(f"parameters.{param.name}: required by method '{method.name}'")
        return self


def _check_tokenizer(source: str | None, block: TokenizerSettings | None) -> None:
    if block is None:
        if source == "union":
            raise ConfigError(f"tokenizer_source: {UNION_REFUSED}")
        return
    if source is not None:
        raise ConfigError("tokenizer: give tokenizer_source or the tokenizer block, not both")
    if block.source == "union":
        default = (
            " (mergekit's default when the block gives no source)"
            if "source" not in block.model_fields_set
            else ""
        )
        raise ConfigError(f"tokenizer.source: {UNION_REFUSED}{default}")
    if block.tokens:
        raise ConfigError(
            f"tokenizer.tokens: per-token embedding sources ({', '.join(block.tokens)}) are not "
            "supported; mergeflow merges models that share a vocabulary and keeps their embeddings"
        )
    if block.pad_to_multiple_of is not None and block.pad_to_multiple_of < 1:
        raise ConfigError(
            f"tokenizer.pad_to_multiple_of: must be a positive integer, got {block.pad_to_multiple_of}"
        )


UNION_REFUSED = (
    "'union' is not supported (it builds a new vocabulary and embeddings); use 'base' or a "
    "model whose tokenizer all the models share"
)


def _check_parameters(method: MergeMethod, settings: dict, where: str, per_model_only: bool) -> None:
    allowed = [p.name for p in method.params if p.per_model or not per_model_only]
    for name, setting in settings.items():
        param = method.param(name)
        if param is not None and name not in allowed:
            raise ConfigError(
                f"{where}.{name}: method '{method.name}' takes one {name} for all models; "
                "set it under the top-level parameters"
            )
        if param is None:
            raise ConfigError(
                f"{where}.{name}: unknown parameter for method '{method.name}' "
                f"(supported here: {', '.join(allowed) or 'none'})"
            )
        if param.kind is not float and _has_gradient(setting):
            kind = "an integer" if param.kind is int else "true or false"
            raise ConfigError(
                f"{where}.{name}: must be {kind}, so it cannot be a gradient over layers "
                "(a gradient interpolates between its values)"
            )
        for value in _leaves(setting):
            _check_value(param, value, f"{where}.{name}")


def _has_gradient(setting: Any) -> bool:
    if isinstance(setting, ConditionalParameter):
        return _has_gradient(setting.value)
    if isinstance(setting, list):
        return any(not isinstance(item, ConditionalParameter) or _has_gradient(item) for item in setting)
    return False


def _leaves(setting: Any) -> list:
    if isinstance(setting, ConditionalParameter):
        return _leaves(setting.value)
    if isinstance(setting, list):
        return [leaf for item in setting for leaf in _leaves(item)]
    return [setting]


def _check_value(param: Param, value: Any, where: str) -> None:
    if param.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        if not param.check(value):
            raise ConfigError(f"{where}: {param.check_message}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: must be a number, got {value!r}")
    if not param.check(float(value)):
        raise ConfigError(f"{where}: {param.check_message}, got {value!r}")


_MERGEKIT_ONLY = {
    "modules": "per-module configs (modules) are not supported",
}


def load_config(path: str | Path) -> MergeConfig:
    """Read a mergekit-style YAML file; every problem becomes one ConfigError line."""
    try:
        documents = list(yaml.safe_load_all(Path(path).read_text()))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
    if len(documents) > 1:
        raise ConfigError(
            f"{path}: {len(documents)} YAML documents, as in a mergekit-mega file of several merges; "
            "mergeflow takes one merge per file: split it, each later file naming an earlier output"
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
    for key, hint in _MERGEKIT_ONLY.items():
        if key in raw:
            raise ConfigError(f"{source}: {key}: {hint}")
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
    return f"{where}: {error['msg']}"


def _fields_at(location: tuple) -> list[str]:
    """The keys allowed where an unknown key was found."""
    if len(location) == 1:
        return list(MergeConfig.model_fields)
    if any(isinstance(part, str) and "ConditionalParameter" in part for part in location):
        return list(ConditionalParameter.model_fields)
    if location[0] == "tokenizer":
        return list(TokenizerSettings.model_fields)
    if location[0] != "slices":
        return list(ModelEntry.model_fields)
    return list(SliceSource.model_fields if "sources" in location[:-1] else LayerSlice.model_fields)


def _is_union_branch(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES)


_UNION_BRANCHES = ("str", "int", "float", "bool", "ConditionalParameter")
