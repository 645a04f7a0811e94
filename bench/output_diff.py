"""How far two merged models are apart, tensor by tensor (mergeflow's output against mergekit's
in bench/merge_bench.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def tensor_index(folder: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """{tensor name: open safetensors handle} over every shard in `folder`."""
    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        handle = stack.enter_context(safe_open(str(file), framework="pt"))
        index.update(dict.fromkeys(handle.keys(), handle))
    return index


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (x in float32)."""
    _, exponent = torch.frexp(x.abs().clamp(min=torch.finfo(dtype).tiny))
    return torch.ldexp(torch.full_like(x, torch.finfo(dtype).eps / 2), exponent)


def compare(mergeflow_out: Path, mergekit_out: Path, base: Path) -> dict[str, Any]:
    """Differences between the two outputs, one tensor at a time. The spread of the merged
    changes (merged − base) counts the tensors the base has under the same name (all of them
    but in a layer-sliced merge)."""
    max_abs = rel = 0.0
    worst = ""
    beyond_ulp = entries = delta_entries = 0
    moments = {"mergeflow": [0.0, 0.0], "mergekit": [0.0, 0.0]}  # Σδ, Σδ² of merged − base
    with contextlib.ExitStack() as stack:
        mf, mk, b = (tensor_index(f, stack) for f in (mergeflow_out, mergekit_out, base))
        if set(mf) != set(mk):
            raise RuntimeError(f"tensor names differ: {sorted(set(mf) ^ set(mk))[:5]}")
        for name, handle in mf.items():
            raw = handle.get_tensor(name)
            a, c = raw.float(), mk[name].get_tensor(name).float()
            diff = (a - c).abs()
            tensor_max = float(diff.max())
            if tensor_max > max_abs:
                max_abs, worst = tensor_max, name
            beyond_ulp += int((diff > ulp(torch.maximum(a.abs(), c.abs()), raw.dtype)).sum())
            entries += diff.numel()
            if name not in b:
                continue
            base_t = b[name].get_tensor(name).float()
            rel = max(rel, tensor_max / max(float(base_t.abs().max()), 1e-12))
            delta_entries += diff.numel()
            for tool, merged in (("mergeflow", a), ("mergekit", c)):
                delta = (merged - base_t).double()
                moments[tool][0] += float(delta.sum())
                moments[tool][1] += float(delta.square().sum())
    stats = {}
    for tool, (s, s2) in moments.items():
        mean = s / max(delta_entries, 1)
        stats[tool] = {
            "delta_mean": mean,
            "delta_std": max(s2 / max(delta_entries, 1) - mean * mean, 0.0) ** 0.5,
        }
    ratio = stats["mergeflow"]["delta_std"] / max(stats["mergekit"]["delta_std"], 1e-30)
    return {
        "max_abs_diff": max_abs,
        "worst_tensor": worst,
        "max_abs_diff_rel_base": rel,
        "frac_beyond_1ulp": beyond_ulp / entries,
        "delta_std_ratio": ratio,
        "delta_stats": stats,
    }
