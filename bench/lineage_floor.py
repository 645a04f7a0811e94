"""The least time a `mergeflow merge` of a config can take on this machine, from two costs
every such merge pays: sha256 over the bytes of every input file and of every file it writes,
which the manifest records as the lineage (issue 3), and starting Python with the merge engine
imported. Both are CPU work; on `cores` cores nothing that does them finishes sooner than their
CPU-seconds over `cores`.

The merge_bench table sets this floor beside a tenth of mergekit's time: where the floor is
the larger, 10× over mergekit cannot be reached on this machine while the inputs are hashed.
The arithmetic, the reading and the writing come on top and are not counted.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from mergeflow.file_hashes import LOCAL_PIECE, local_model_files

IMPORT_RUNS = 3


def hashing_cpu_seconds(files: list[Path]) -> float:
    """CPU-seconds of this thread in sha256 alone over the bytes of `files`, each piece hashed
    right after it was read into the core's cache (the reads not counted): the least hashing
    them costs, wherever the bytes come from. (mergeflow reads its inputs a second time to hash
    them, and hashes its output from memory as it writes it.)"""
    piece = bytearray(LOCAL_PIECE)
    view = memoryview(piece)
    seconds = 0.0
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb", buffering=0) as f:
            while read := f.readinto(piece):
                started = time.thread_time()
                digest.update(view[:read])
                seconds += time.thread_time() - started
    return seconds


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


def lineage_floor(config_path: Path, output: Path, imports_cpu: float) -> dict[str, float]:
    """The floor for one merge config whose output mergeflow wrote to `output`: the hashing of
    the input files `mergeflow merge` hashes (file_hashes.local_model_files) and of the output's
    files. `floor_cached_s` is the floor of a repeated merge whose input hashes are remembered:
    the output's hashing and the imports only."""
    inputs = [Path(f) for f in local_model_files(config_path)]
    outputs = [f for f in sorted(output.iterdir()) if f.is_file()]
    input_cpu, output_cpu = hashing_cpu_seconds(inputs), hashing_cpu_seconds(outputs)
    input_bytes = sum(f.stat().st_size for f in inputs)
    cores = len(os.sched_getaffinity(0))
    return {
        "cores": cores,
        "input_bytes": input_bytes,
        "output_bytes": sum(f.stat().st_size for f in outputs),
        "sha256_gb_per_s": input_bytes / input_cpu / 1e9,
        "sha256_cpu_s": input_cpu + output_cpu,
        "imports_cpu_s": imports_cpu,
        "floor_s": (input_cpu + output_cpu + imports_cpu) / cores,
        "floor_cached_s": (output_cpu + imports_cpu) / cores,
    }
