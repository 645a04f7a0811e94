"""Method parameters as configs set them, their checks, and their values for one tensor, by
mergekit's rules: a filter list's first entry whose filter is in the tensor name applies; a
list of numbers is a gradient over the layers, layer i of L at position i/(L-1); a model's own
setting wins over its slice's, which wins over the global one, which wins over the method's
default."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict

from mergeflow.errors import ConfigError
from mergeflow.methods import MergeMethod, Param

if TYPE_CHECKING:
    from mergeflow.config import MergeConfig
    from mergeflow.config_models import ModelGroup

Scalar = bool | int | float | str


class ConditionalParameter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | Scalar | list[Scalar]


def empty_when_null(empty):
    """A key written with no value (`parameters:`) is empty, as mergekit reads it."""
    return BeforeValidator(lambda value: empty() if value is None else value)


Parameters = Annotated[dict[str, ParameterSetting], empty_when_null(dict)]


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve a filter list or gradient to the value for one tensor (None: no match)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(e, ConditionalParameter) for e in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    if any(isinstance(e, bool) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    low = int(scaled)
    high = min(len(setting) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * setting[low] + frac * setting[high]


def resolve_parameters(config: MergeConfig, group: ModelGroup, tensor_name: str, t: float) -> dict[str, Any]:
    """Parameter values for one output tensor at gradient position `t`, made from the models of
    `group`: shared ones as numbers or flags, per-model ones as [N] float32 arrays. A model's
    settings win over its slice's, which win over the global ones, which win over defaults."""
    method = config.method
    shared = [group.parameters, config.parameters]
    resolved: dict[str, Any] = {}
    for param in method.params:
        if param.per_model:
            values = [_first(param, [entry.parameters, *shared], tensor_name, t) for entry in group.entries]
            resolved[param.name] = np.array(values, dtype=np.float32)
        else:
            resolved[param.name] = _first(param, shared, tensor_name, t)
    return resolved


def _first(param: Param, scopes: list[dict], tensor_name: str, t: float) -> Any:
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                return value
    if param.default is None:
        raise ConfigError(f"parameters.{param.name}: no value applies to tensor '{tensor_name}'")
    return param.default


def check_parameters(method: MergeMethod, settings: dict, where: str, per_model_only: bool) -> None:
    """Every setting in `settings` (found at `where`) names a parameter of the method that may
    be set there, and every value in it is valid for that parameter."""
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
