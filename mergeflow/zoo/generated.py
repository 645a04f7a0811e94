"""A generated Llama zoo: a random base and experts = base + task vectors whose signs
conflict on purpose. The weights are random, not trained; the names say "generated".

The tensor names and shapes come from transformers' LlamaForCausalLM, so the folders load
with AutoModelForCausalLM and mergekit reads them like any Llama checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergeflow.output import ShardedWriter
from mergeflow.safetensors_io import DTYPES_BY_LONG_NAME, PlannedTensor, numpy_view


@dataclass(frozen=True)
class GeneratedZooSpec:
    hidden_size: int = 64
    num_layers: int = 2
    vocab_size: int = 256
    intermediate_size: int = 128
    num_heads: int = 4
    num_experts: int = 4
    dtype: str = "float32"
    shard_bytes: int = 1 << 30
    task_vector_scale: float = 0.01
    seed: int = 0


BENCH_166M = GeneratedZooSpec(
    hidden_size=1024,
    num_layers=8,
    vocab_size=32000,
    intermediate_size=2816,
    num_heads=16,
    num_experts=8,
    dtype="bfloat16",
    shard_bytes=200_000_000,
)


def llama_config(spec: GeneratedZooSpec) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        vocab_size=spec.vocab_size,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        torch_dtype=spec.dtype,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of LlamaForCausalLM's weights, read off a model on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def build_generated_zoo(folder: str | Path, spec: GeneratedZooSpec = GeneratedZooSpec()) -> dict:
    """Write base/ and expert_0..expert_{n-1}/ under `folder`; returns {name: path}.

    Expert i's task vector is scale · (shared · s_i + own_i) with s_i = +1 for even i and
    −1 for odd i, so experts disagree in sign on the shared direction, as TIES expects.
    """
    folder = Path(folder)
    dtype = getattr(torch, spec.dtype)
    config = llama_config(spec)
    shapes = tensor_shapes(config)
    plan = [PlannedTensor(name, DTYPES_BY_LONG_NAME[spec.dtype], shape) for name, shape in shapes.items()]
    names = ["base"] + [f"expert_{i}" for i in range(spec.num_experts)]
    writers = {}
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        writers[name] = ShardedWriter(folder / name, plan, spec.shard_bytes)
    generator = torch.Generator().manual_seed(spec.seed)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base = torch.ones(shape)
        else:
            base = torch.randn(shape, generator=generator).mul_(0.02)
        writers["base"].write(name, numpy_view(base.to(dtype).reshape(-1)))
        shared = torch.randn(shape, generator=generator)
        for i in range(spec.num_experts):
            sign = 1.0 if i % 2 == 0 else -1.0
            own = torch.randn(shape, generator=generator)
            expert = base + spec.task_vector_scale * (sign * shared + own)
            writers[f"expert_{i}"].write(name, numpy_view(expert.to(dtype).reshape(-1)))
    for writer in writers.values():
        writer.finish()
    (folder / "zoo.json").write_text(json.dumps({"kind": "generated", "spec": asdict(spec)}, indent=2))
    return {name: str(folder / name) for name in names}
