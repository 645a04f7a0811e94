"""Full fine-tuning (every parameter) and pre-training of small causal LMs on the CPU.

Two kinds of sequences:
- language-model text: documents joined by EOS and cut into fixed-length windows, loss on
  every token (pre-training);
- multiple-choice examples: prompt + " answer" + EOS, loss only on the answer and EOS — the
  same token sequences `mergeflow.eval.scoring` scores (prompt and answer tokenised apart).

Deterministic for a seed on a given machine: examples are drawn in a seeded order, one epoch
after another.

Precision: float32, or `mixed-bfloat16` — matrix products in bfloat16 under autocast, weights,
gradients, optimizer state and the element-wise work in float32. On a CPU with native bfloat16
dot products (AVX512_BF16, AMX) a zoo expert's step is 1.5-1.9x faster (docs/zoo.md); elsewhere
bfloat16 is emulated and slower, so `resolved_precision` falls back to float32 there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from mergeflow.errors import ZooError
from mergeflow.eval.scoring import body_and_head, encode_many

IGNORE = -100
Precision = Literal["float32", "mixed-bfloat16"]


@dataclass(frozen=True)
class TrainSpec:
    """Hyper-parameters; recorded with every checkpoint trained with them."""

    steps: int
    lr: float
    batch_size: int
    seed: int = 0
    max_len: int = 128
    warmup_steps: int = 10
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.1
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        # A misspelt precision would otherwise train in float32 without a word.
        if self.precision not in get_args(Precision):
            raise ZooError(f"TrainSpec.precision: {self.precision!r} is not one of {get_args(Precision)}")

    def as_dict(self) -> dict:
        return asdict(self)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether the device multiplies bfloat16 matrices natively (faster than float32). torch has
    no public query for the CPU's AVX512_BF16 (AMX CPUs have it too), so this asks torch.cpu's
    private one."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()


def resolved_precision(spec: TrainSpec, device: torch.device) -> TrainSpec:
    """The spec as it will train on `device`: mixed precision only where bfloat16 is fast. The
    cache keys and checkpoint records use this, so they say how a model was really trained."""
    if spec.precision == "mixed-bfloat16" and not fast_bfloat16(device):
        return replace(spec, precision="float32")
    return spec


@dataclass(frozen=True)
class TrainSequence:
    ids: list[int]
    loss_from: int  # tokens before this index carry no loss


def text_windows(tokenizer, texts: Iterable[str], max_len: int) -> list[TrainSequence]:
    """Documents joined by EOS, cut into windows of max_len tokens (the last partial one dropped)."""
    stream: list[int] = []
    for ids in encode_many(tokenizer, list(texts)):
        stream += ids + [tokenizer.eos_token_id]
    return [TrainSequence(stream[i : i + max_len], 0) for i in range(0, len(stream) - max_len + 1, max_len)]


def choice_sequences(
    tokenizer, prompts: Sequence[str], answers: Sequence[str], max_len: int
) -> list[TrainSequence]:
    """prompt + answer + EOS, loss on answer and EOS; over-long prompts keep their end."""
    sequences = []
    pairs = zip(encode_many(tokenizer, prompts), encode_many(tokenizer, answers), strict=True)
    for prompt_ids, answer_ids in pairs:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        prompt_ids = prompt_ids[-(max_len - len(answer_ids)) :]
        sequences.append(TrainSequence(prompt_ids + answer_ids, len(prompt_ids)))
    return sequences


def dataset_sequences(tokenizer, dataset, max_len: int) -> list[TrainSequence]:
    """Sequences from a task split (columns prompt, choices, label): the right answer is the target."""
    answers = [choices[label] for choices, label in zip(dataset["choices"], dataset["label"], strict=True)]
    return choice_sequences(tokenizer, dataset["prompt"], answers, max_len)


def _schedule(spec: TrainSpec):
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cosine

    return factor


def _order(count: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    indices: list[int] = []
    while len(indices) < needed:
        indices += torch.randperm(count, generator=generator).tolist()
    return [indices[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor  # restart at 0 where a sequence starts, within a row

    def to(self, device) -> Batch:
        return Batch(self.ids.to(device), self.labels.to(device), self.positions.to(device))


def _rows(sequences: list[TrainSequence], capacity: int) -> list[list[TrainSequence]]:
    """Sequences in their drawn order, each appended to the last row while it stays within
    `capacity` tokens; one sequence per row when capacity is 0."""
    rows: list[list[TrainSequence]] = []
    used = 0
    for sequence in sequences:
        if rows and used + len(sequence.ids) <= capacity:
            rows[-1].append(sequence)
            used += len(sequence.ids)
        else:
            rows.append([sequence])
            used = len(sequence.ids)
    return rows


def _batch(sequences: list[TrainSequence], pad: int, capacity: int, width_multiple: int = 1) -> Batch:
    """Sequences packed into rows of up to `capacity` tokens, then right-padded to the longest
    row, rounded up to a multiple of `width_multiple`. Packing only removes padding (a batch of
    these short examples was ~35% padding): the position ids restart at each sequence, which
    makes transformers mask attention between the sequences of a row, and each sequence's first
    token carries no loss, as the first of a row never does, so the loss is the unpacked
    batch's (tests/test_training.py)."""
    rows = _rows(sequences, capacity)
    width = max(sum(len(s.ids) for s in row) for row in rows)
    width = -(-width // width_multiple) * width_multiple
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for sequence in row:
            end = start + len(sequence.ids)
            loss_from = max(sequence.loss_from, 1)
            ids[r, start:end] = torch.tensor(sequence.ids)
            labels[r, start + loss_from : end] = torch.tensor(sequence.ids[loss_from:])
            positions[r, start:end] = torch.arange(end - start)
            start = end
        positions[r, start:] = torch.arange(width - start)  # padding: a sequence of its own
    return Batch(ids, labels, positions)


def row_capacity(model, spec: TrainSpec) -> int:
    """Tokens per batch row: several sequences share a row only in models whose attention masks
    follow restarting position ids (transformers' packed-sequence masks, checked for Llama, the
    architecture of every zoo model); other models get one sequence per row."""
    return spec.max_len if model.config.model_type == "llama" else 0


def _loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, projecting to the vocabulary
    only there: with the loss on answers alone, most positions need no logits, and the output
    layer is a fifth of SmolLM2's compute and half of a 2M model's. Same value as the
    model's own `labels=` loss."""
    body, head = body_and_head(model)
    if body is None:
        return model(input_ids=batch.ids, position_ids=batch.positions, labels=batch.labels).loss
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE
    output = body(input_ids=batch.ids, position_ids=batch.positions, use_cache=False)
    hidden = output.last_hidden_state[:, :-1][scored]
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets[scored])


@contextmanager
def _eager_attention(model, enabled: bool):
    """Eager attention while training in mixed precision: the CPU's fused attention kernel is so
    slow backwards in bfloat16 that a 5M step took longer than in float32."""
    if not enabled:
        yield
        return
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(attention)


def train(
    model,
    sequences: list[TrainSequence],
    spec: TrainSpec,
    pad_id: int,
    description: str = "training",
    progress: bool = True,
) -> dict:
    """Train every parameter of `model` in place; returns loss and throughput figures."""
    if not sequences:
        raise ZooError(f"{description}: no training sequences")
    torch.manual_seed(spec.seed)
    device = next(model.parameters()).device
    model.train()
    mixed = spec.precision == "mixed-bfloat16"
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        betas=(0.9, 0.95),
        # The optimizer is a tenth of a mixed-precision step; its fused kernel saves ~8% of it.
        fused=mixed,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec))
    capacity = row_capacity(model, spec)
    # oneDNN, which multiplies bfloat16 matrices on the CPU, prepares a kernel for every new
    # shape; rows of any width from ~40 to 96 tokens made a 5M step 78 ms instead of 61 with
    # widths rounded up to a multiple of 16 (float32 products prepare nothing per shape).
    width_multiple = 16 if mixed else 1
    losses, tokens, started = [], 0, time.perf_counter()
    bar = tqdm(
        _order(len(sequences), spec.steps, spec.batch_size, spec.seed),
        desc=description,
        unit="step",
        disable=not progress,
        leave=False,
    )
    with _eager_attention(model, mixed):
        for step_indices in bar:
            # Right padding needs no attention mask under a causal mask, and restarting position
            # ids keep the sequences of a row apart; padded labels are ignored.
            batch = _batch([sequences[i] for i in step_indices], pad_id, capacity, width_multiple).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                loss = _loss(model, batch)
            if not torch.isfinite(loss):
                raise ZooError(
                    f"{description}: loss became {loss.item()} at step {len(losses)}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            tokens += batch.ids.numel()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    seconds = time.perf_counter() - started
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
    }
