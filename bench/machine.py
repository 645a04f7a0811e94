"""What machine a benchmark ran on. These 2-core machines are not all alike: the CPU model, and
with it float32 matmul speed, has differed ~3x between sessions, so every result file names
the CPU and a measured matmul rate next to its numbers."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

# CPU features that change what torch's CPU kernels can do (bf16 matmul on AMX tiles above all).
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> str | None:
    """The value of `field` for the first CPU in /proc/cpuinfo; None where there is no such file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    present = set((_cpuinfo("flags") or "").split())
    return [flag for flag in FLAGS_OF_INTEREST if flag in present]


def matmul_gflops(dtype: torch.dtype, repeats: int = 10) -> float:
    """GFLOP/s of one SmolLM2-shaped matrix product (1024 tokens x 576 -> 1536) on torch's threads."""
    a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 1024 * 576 * 1536 * repeats / (time.perf_counter() - started) / 1e9


def describe_machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "matmul_gflops_float32": round(matmul_gflops(torch.float32)),
        "matmul_gflops_bfloat16": round(matmul_gflops(torch.bfloat16)),
    }


def machine_line(machine: dict) -> str:
    """One Markdown line for a result file's header."""
    flags = ", ".join(machine["cpu_flags"]) or "none of " + ", ".join(FLAGS_OF_INTEREST)
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({flags}); matmul on "
        f"{machine['torch_threads']} threads: {machine['matmul_gflops_float32']} GFLOP/s float32, "
        f"{machine['matmul_gflops_bfloat16']} bfloat16."
    )
