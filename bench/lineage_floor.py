"""The least time a `mergeflow merge` of a config can take on this machine, from two costs every
such merge pays: sha256 of every input file and of the output, which the manifest records as
the lineage (issue 3), and starting Python with the merge engine imported. Both are CPU work;
on `cores` cores nothing that does them finishes sooner than their CPU-seconds over `cores`.

The merge_bench table sets this floor beside a tenth of mergekit's time: where the floor is
the larger, 10× over mergekit cannot be reached on this machine while the inputs are hashed.
The arithmetic, the reading and the writing come on top and are not counted.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mergeflow.file_hashes import local_file_sha256

IMPORT_RUNS = 3


def model_folders(config_path: Path) -> list[Path]:
    """The local model folders a mergekit YAML names: the base and every model."""
    config = yaml.safe_load(config_path.read_text())
    names = [config["base_model"]] if config.get("base_model") else []
    names += [entry["model"] for entry in config["models"]]
    return [Path(name) for name in dict.fromkeys(names)]


def hashed_files(folder: Path) -> list[Path]:
    """What the manifest hashes of a model folder: config.json and the weight files."""
    return [folder / "config.json", *sorted(folder.glob("*.safetensors"))]


def sha256_cpu_seconds(files: list[Path]) -> tuple[float, int]:
    """CPU-seconds of this thread to sha256 `files` as a merge does (no hash cache), and their bytes."""
    started = time.thread_time()
    for file in files:
        local_file_sha256(str(file), remember=False)
    return time.thread_time() - started, sum(f.stat().st_size for f in files)


def import_cpu_seconds() -> float:
    """CPU-seconds of a fresh Python that imports the merge engine and the CLI: the fewest of
    IMPORT_RUNS runs (a floor)."""
    seconds = []
    for _ in range(IMPORT_RUNS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", "import mergeflow.engine, mergeflow.cli"], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return min(seconds)


def lineage_floor(config_path: Path, imports_cpu: float) -> dict[str, float]:
    """The floor for one merge config. The output is taken to be as large as the first
    model's weights (the bench's merges keep its shapes and dtype); its hash is costed at the
    inputs' rate. `floor_cached_s` is the floor of a repeated merge whose input hashes are
    remembered: the output's hash and the imports only."""
    folders = model_folders(config_path)
    files = [f for folder in folders for f in hashed_files(folder)]
    cpu, input_bytes = sha256_cpu_seconds(files)
    output_bytes = sum(f.stat().st_size for f in hashed_files(folders[0]))
    output_cpu = cpu * output_bytes / input_bytes
    cores = len(os.sched_getaffinity(0))
    return {
        "cores": cores,
        "input_bytes": input_bytes,
        "output_bytes": output_bytes,
        "sha256_gb_per_s": input_bytes / cpu / 1e9,
        "sha256_cpu_s": cpu + output_cpu,
        "imports_cpu_s": imports_cpu,
        "floor_s": (cpu + output_cpu + imports_cpu) / cores,
        "floor_cached_s": (output_cpu + imports_cpu) / cores,
    }
