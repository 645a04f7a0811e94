"""The zero-configuration demo: generate a small zoo, merge it with every method, and
summarise each result. Later stages (evaluation, pipeline) grow it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.methods import METHODS
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo


@dataclass(frozen=True)
class DemoRow:
    method: str
    seconds: float
    delta_norm: float  # |θ − θ0| / mean_i |τi|
    cosine_to_sum: float  # cos(θ − θ0, Σ τi)
    agreement: float  # fraction of entries whose merged delta sign matches the summed sign


def demo_configs(zoo: dict[str, str]) -> dict[str, dict]:
    """One mergekit-style config per method, with the paper's usual settings."""
    experts = [path for name, path in zoo.items() if name.startswith("expert_")]
    configs = {}
    for name, method in METHODS.items():
        merged = experts[: method.max_models]  # slerp and nearswap take one, nuslerp two
        models = [{"model": path} for path in merged]
        parameters: dict = {}
        if method.param("density") is not None:
            models = [{"model": path, "parameters": {"density": 0.5}} for path in merged]
        if name == "task_arithmetic":
            parameters = {"lambda": 1.0 / len(experts)}
        if name == "sce":
            parameters = {"select_topk": 0.5}
        if name == "slerp":
            parameters = {"t": 0.5}
        if name == "nearswap":
            parameters = {"t": 0.01}
        configs[name] = {
            "merge_method": name,
            "base_model": zoo["base"],
            "models": models,
            "parameters": parameters,
        }
    return configs


DEMO_ZOO = GeneratedZooSpec(num_experts=4)


def run_demo(workdir: Path, spec: GeneratedZooSpec = DEMO_ZOO) -> list[DemoRow]:
    zoo_dir = workdir / "zoo-generated"
    zoo = (
        {p.name: str(p) for p in sorted(zoo_dir.iterdir()) if p.is_dir()}
        if (zoo_dir / "zoo.json").exists()
        else build_generated_zoo(zoo_dir, spec)
    )
    base = _load(zoo["base"])
    task_vectors = [_flat(_load(p)) - _flat(base) for n, p in zoo.items() if n.startswith("expert_")]
    summed = torch.stack(task_vectors).sum(0)
    rows = []
    for name, raw in demo_configs(zoo).items():
        started = time.perf_counter()
        result = merge(parse_config(raw, source=name), str(workdir / "merged" / name), overwrite=True)
        delta = _flat(_load(result.output)) - _flat(base)
        rows.append(
            DemoRow(
                method=name,
                seconds=time.perf_counter() - started,
                delta_norm=float(delta.norm() / torch.stack([t.norm() for t in task_vectors]).mean()),
                cosine_to_sum=float(torch.nn.functional.cosine_similarity(delta, summed, dim=0)),
                agreement=float((torch.sign(delta) == torch.sign(summed)).float().mean()),
            )
        )
    return rows


def _load(folder: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].float().reshape(-1) for k in sorted(tensors)])
