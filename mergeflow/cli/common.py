"""What every command shares: one-line errors, sizes like 2GB."""

from __future__ import annotations

import re
from functools import wraps

import typer

from mergeflow.errors import MergeflowError

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}


def parse_size(text: str) -> int:
    """'200MB' -> 200_000_000 (decimal units, as Hugging Face's max_shard_size)."""
    match = SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"'{text}' is not a size like 500MB or 2GB")
    size = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    if size <= 0:
        raise typer.BadParameter(f"'{text}' is no size: give one above zero, like 500MB or 2GB")
    if match.group(2).upper() == "B" and size < 1000:
        # mergekit's --out-shard-size counts parameters, where 5B means 5 billion
        raise typer.BadParameter(
            f"'{text}' is {size} bytes: sizes here are in bytes, like 500MB or 2GB (mergekit's "
            "--out-shard-size counts parameters, and 5B there is 5 billion)"
        )
    return size


def friendly_errors(command):
    @wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MergeflowError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return run
