"""What the parity scripts share: one config merged by mergekit and by mergeflow, timed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mergeflow.config import parse_config
from mergeflow.engine import merge


@dataclass(frozen=True)
class BothMerged:
    mergekit: Path
    mergeflow: Path
    mergekit_seconds: float  # a process of its own, start-up included
    mergeflow_seconds: float  # in this process


def merge_with_both(root: Path, settings: dict) -> BothMerged:
    """`settings` (a mergekit config) merged into root/mergekit by mergekit-yaml and into
    root/mergeflow by mergeflow, each folder emptied first."""
    (root / "config.yaml").write_text(yaml.safe_dump(settings))
    mergekit_out, mergeflow_out = root / "mergekit", root / "mergeflow"
    for folder in (mergekit_out, mergeflow_out):
        shutil.rmtree(folder, ignore_errors=True)
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    mergekit = [str(mergekit_yaml), str(root / "config.yaml"), str(mergekit_out)]
    started = time.perf_counter()
    subprocess.run(mergekit, check=True, capture_output=True)
    mergekit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    merge(parse_config(settings), str(mergeflow_out))
    return BothMerged(mergekit_out, mergeflow_out, mergekit_seconds, time.perf_counter() - started)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def markdown_table(columns: list[str], rows: list[str]) -> str:
    """A Markdown table of `columns` over `rows` (each already a `| ... |` line)."""
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows])
