"""LoRA adapter folders laid out as PEFT saves them, written by hand: for tests that need an
adapter for a generated zoo model, or a broken one. (tests/test_lora.py checks the math
against adapters PEFT itself writes.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergeflow.safetensors_io import read_header
from mergeflow.storage import locate


def write_adapter(
    folder: Path,
    model_folder: str | Path,
    modules: list[str],
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    settings: dict | None = None,
) -> Path:
    """A LoRA adapter for `modules` (e.g. 'model.layers.0.self_attn.q_proj') of the model in
    `model_folder`, with seeded random factors of rank `r`; `settings` add to or override
    adapter_config.json."""
    shapes = {}
    for file in Path(model_folder).glob("*.safetensors"):
        shapes |= {entry.name: entry.shape for entry in read_header(locate(str(file)))}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        rows, columns = shapes[f"{module}.weight"]
        tensors[f"base_model.model.{module}.lora_A.weight"] = (
            torch.randn(r, columns, generator=generator) * 0.1
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, r, generator=generator) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({m.split(".")[-1] for m in modules}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config | (settings or {})))
    return folder
