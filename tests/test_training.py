"""The training loss projects to the vocabulary only where there are labels and packs short
sequences into shared rows; it must equal the model's own loss on one padded sequence per row,
and its gradients the model's. Training is deterministic for a seed (the zoo's cache and
gate rely on it). Importing mergeflow sets how OpenMP threads wait, which training speed
depends on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import random_llama
from transformers import GPT2Config, GPT2LMHeadModel

from mergeflow.errors import ZooError
from mergeflow.zoo.training import (
    IGNORE,
    TrainSequence,
    TrainSpec,
    _batch,
    _loss,
    resolved_precision,
    row_capacity,
    train,
)


def _sequences(answer_only: bool) -> list[TrainSequence]:
    generator = torch.Generator().manual_seed(1)
    lengths, prompts = (7, 12, 5, 9, 3, 10), (4, 9, 2, 8, 1, 3)
    return [
        TrainSequence(
            torch.randint(0, 97, (length,), generator=generator).tolist(), prompt if answer_only else 0
        )
        for length, prompt in zip(lengths, prompts, strict=True)
    ]


def _padded_reference(sequences: list[TrainSequence], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence per row, right-padded; labels from each sequence's loss_from."""
    width = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    labels = torch.full((len(sequences), width), IGNORE)
    for row, s in enumerate(sequences):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        labels[row, s.loss_from : len(s.ids)] = torch.tensor(s.ids[s.loss_from :])
    return ids, labels


# Mixed-precision training switches to eager attention, whose packed-sequence masks must hold too.
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("capacity", [0, 16, 64], ids=["one-per-row", "packed-in-rows", "one-row"])
@pytest.mark.parametrize("answer_only", [True, False], ids=["answer-only", "every-token"])
# Mixed precision rounds the width of the rows up to a multiple of 16 tokens.
@pytest.mark.parametrize("width_multiple", [1, 16])
def test_the_loss_and_its_gradients_equal_the_models_own(answer_only, capacity, attention, width_multiple):
    model = random_llama(97, tie_word_embeddings=True)
    model.set_attn_implementation(attention)
    sequences = _sequences(answer_only)
    batch = _batch(sequences, pad=0, capacity=capacity, width_multiple=width_multiple)
    assert len(batch.ids) == {0: 6, 16: 4, 64: 1}[capacity]  # the sequences really share rows
    unpadded_width = {0: 12, 16: 14, 64: 46}[capacity]
    assert batch.ids.shape[1] == -(-unpadded_width // width_multiple) * width_multiple
    ours = _loss(model, batch)
    ours.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ids, labels = _padded_reference(sequences, pad=0)
    theirs = model(input_ids=ids, labels=labels).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for ours_g, p in zip(our_grads, model.parameters(), strict=True):
        torch.testing.assert_close(ours_g, p.grad, rtol=1e-5, atol=1e-7)


def _trained(seed: int, precision: str = "float32"):
    model = random_llama(97, tie_word_embeddings=True)
    spec = TrainSpec(
        steps=20, lr=3e-3, batch_size=4, max_len=32, warmup_steps=2, seed=seed, precision=precision
    )
    stats = train(model, _sequences(answer_only=True), spec, pad_id=0, progress=False)
    return model, stats


def _trained_weights(seed: int, precision: str = "float32") -> list[torch.Tensor]:
    return [p.detach().clone() for p in _trained(seed, precision)[0].parameters()]


@pytest.mark.parametrize("precision", ["float32", "mixed-bfloat16"])
def test_training_is_deterministic_for_a_seed(precision):
    first, again = _trained_weights(0, precision), _trained_weights(0, precision)
    other = _trained_weights(1, precision)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(first, other, strict=True))


def test_mixed_precision_multiplies_in_bfloat16_and_keeps_float32_weights():
    model, stats = _trained(0, "mixed-bfloat16")
    assert stats["final_loss"] < stats["first_loss"] - 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The model goes back to its own attention after training with eager attention.
    assert model.config._attn_implementation == "sdpa"
    float32 = _trained_weights(0, "float32")
    mixed = [p.detach() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(mixed, float32, strict=True))
    # Rounded products, not another computation: the two trainings stay close.
    for a, b in zip(mixed, float32, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05)


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ZooError, match="TrainSpec.precision: 'bfloat16'"):
        TrainSpec(steps=1, lr=1e-3, batch_size=4, precision="bfloat16")


def test_mixed_precision_falls_back_to_float32_where_bfloat16_is_not_native():
    mixed = TrainSpec(steps=1, lr=1e-3, batch_size=4, precision="mixed-bfloat16")
    assert resolved_precision(mixed, torch.device("meta")).precision == "float32"
    float32 = TrainSpec(steps=1, lr=1e-3, batch_size=4)
    assert resolved_precision(float32, torch.device("cpu")) == float32


def test_zoo_models_pack_and_other_architectures_do_not():
    spec = TrainSpec(steps=1, lr=1e-3, batch_size=4, max_len=96)
    assert row_capacity(random_llama(97), spec) == 96
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2))
    assert row_capacity(gpt2, spec) == 0


def _openmp_settings(env: dict[str, str]) -> list[str]:
    code = "import os, mergeflow; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_importing_mergeflow_sets_a_short_openmp_spin_unless_the_user_chose():
    # Passive waiting alone made every training step wake torch's threads from sleep (1.6-1.9x
    # slower); the spin count must come with it, and a user's settings must survive.
    assert _openmp_settings({}) == ["PASSIVE", "100000"]
    assert _openmp_settings({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "5"}) == ["ACTIVE", "5"]
