"""Parameter values for one tensor, by mergekit's rules: a filter list's first entry whose
filter is in the tensor name applies; a list of numbers is a gradient over the layers, layer i
of L at position i/(L-1); a model's own setting wins over the global one, which wins over the
method's default."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mergeflow.config import ConditionalParameter, MergeConfig
from mergeflow.errors import ConfigError
from mergeflow.methods import Param

LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient position t: layer i of L sits at i/(L-1); other tensors at 0."""
    match = LAYER_PATTERN.search(tensor_name)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


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


def resolve_parameters(config: MergeConfig, tensor_name: str, num_layers: int) -> dict[str, Any]:
    """Parameter values for one tensor: shared ones as numbers or flags, per-model ones as
    [N] float32 arrays. Model settings win over global ones, which win over defaults."""
    method, t = config.method, layer_position(tensor_name, num_layers)
    resolved: dict[str, Any] = {}
    for param in method.params:
        if param.per_model:
            values = [
                _first(param, [entry.parameters, config.parameters], tensor_name, t)
                for entry in config.experts()
            ]
            resolved[param.name] = np.array(values, dtype=np.float32)
        else:
            resolved[param.name] = _first(param, [config.parameters], tensor_name, t)
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
