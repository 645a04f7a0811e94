"""Result files of the benchmarks keep a hand-written history under the latest run."""

from __future__ import annotations

from pathlib import Path

HISTORY = "\nHistory on this 2-core machine"


def write_keeping_history(path: Path, latest: str) -> None:
    """The latest run on top; a hand-written history below it (from HISTORY on) is kept."""
    old = path.read_text() if path.exists() else ""
    history = old[old.index(HISTORY) :] if HISTORY in old else ""
    path.write_text(latest + history)
