"""The training loss projects to the vocabulary only where there are labels; it must equal the
model's own loss, and its gradients the model's. Importing mergeflow sets the OpenMP waiting
training speed depends on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import random_llama

from mergeflow.zoo.training import IGNORE, _loss


@pytest.mark.parametrize("answer_only", [True, False], ids=["answer-only", "every-token"])
def test_the_loss_and_its_gradients_equal_the_models_own(answer_only):
    model = random_llama(97, tie_word_embeddings=True)
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if answer_only:  # prompts of different lengths, then padding on the last row
        labels[0, :7] = IGNORE
        labels[1, :4] = IGNORE
        labels[2, :9] = IGNORE
        labels[2, 11:] = IGNORE
    ours = _loss(model, ids, labels)
    ours.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = model(input_ids=ids, labels=labels).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for ours_g, p in zip(our_grads, model.parameters(), strict=True):
        torch.testing.assert_close(ours_g, p.grad, rtol=1e-5, atol=1e-7)


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
