"""How mergekit configs name a model: a string (a path, URI or repo id, with `@revision` and
`+adapter`), or mergekit's long form, which stands for the string."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


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


ModelReference = Annotated[str, BeforeValidator(_model_reference)]
