"""SCE on small tensors: hand-computed cases for each of its steps (select by variance across
the models, energy weights with mergekit's absolute guard, sign erase), and the whole method
against the reference merge's plain-torch re-statement of mergekit's code."""

from __future__ import annotations

import pytest
import torch
from method_runner import random_task_vectors, run_method
from reference_merge import sce as reference_sce

ZERO = torch.zeros(4)


def test_select_keeps_the_entries_that_vary_most_across_models():
    # variances across the two models: 0, 1, 4, 0; two are non-zero, half of them is entry 2.
    models = torch.tensor([[1.0, 1.0, 2.0, -3.0], [1.0, 3.0, -2.0, -3.0]])
    # Entry 2 alone: equal energies (weights 1/2), a tied vote elects +, so model 0's 2 stays.
    got = run_method("sce", ZERO, models, select_topk=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 2.0, 0.0]))


def test_without_selection_models_weigh_by_the_energy_of_their_task_vectors():
    models = torch.tensor([[1.0, 1.0, 2.0, -3.0], [1.0, 3.0, -2.0, -3.0]])
    w0, w1 = 15 / 38, 23 / 38  # mean squares 15/4 and 23/4
    # entry 1: both agree, weighted mean; entry 2: the vote ties at 0, + wins, model 0 alone.
    expected = torch.tensor([1.0, (1 * w0 + 3 * w1) / (w0 + w1), 2.0, -3.0])
    torch.testing.assert_close(run_method("sce", ZERO, models), expected)


def test_entries_tied_with_the_kth_largest_variance_are_all_kept():
    models = torch.tensor([[1.0, -1.0, 1.0, 0.0], [-1.0, 1.0, -1.0, 0.0]])  # variances 1, 1, 1, 0
    # k = int(3 · 0.5) = 1, and all three variances equal the largest: all are kept. Each vote
    # ties at 0 and elects +, so each entry's positive value remains.
    got = run_method("sce", ZERO, models, select_topk=0.5)
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_entries_equal_in_every_model_have_no_variance_and_are_not_selected():
    # float32 2.9 three times: Σ/3 is not 2.9, so a variance from the plain mean is ~1e-14 > 0
    # and these entries would count towards k and be kept; from differences it is exactly 0.
    models = torch.tensor([[2.9, 2.9, 1.0, -1.0], [2.9, 2.9, -1.0, 0.0], [2.9, 2.9, 0.0, 3.0]])
    got = run_method("sce", torch.zeros(4), models, select_topk=0.5)  # k = int(2 · 0.5) = 1
    assert got[:3].tolist() == [0.0, 0.0, 0.0] and got[3] != 0


def test_a_selection_of_no_entries_gives_the_base():
    base = torch.tensor([0.5, -0.5, 2.0])
    models = base + torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 5.0]])  # one non-zero variance
    torch.testing.assert_close(run_method("sce", base, models, select_topk=0.5), base)  # k = 0


@pytest.mark.parametrize(("scale", "expected"), [(1e-4, 2e-4), (1e-1, 0.28)])
def test_weights_are_uniform_when_the_energies_sum_below_1e_minus_6(scale, expected):
    # Task vectors (1, 0) and (3, 0) times `scale`: energies 0.5 and 4.5 times scale². At 1e-4
    # they sum to 5e-8, under mergekit's guard: weights 1/2 each. At 0.1: 0.1 and 0.9.
    models = torch.tensor([[1.0, 0.0], [3.0, 0.0]]) * scale
    got = run_method("sce", torch.zeros(2), models)
    torch.testing.assert_close(got, torch.tensor([expected, 0.0]), rtol=1e-5, atol=0)


def test_signs_against_the_elected_one_are_erased():
    models = torch.tensor([[2.0, -1.0], [-1.0, -1.0], [-0.5, 3.0]])  # votes: + at 0, + at 1
    got = run_method("sce", torch.zeros(2), models)
    energies = (models**2).mean(1)
    w = energies / energies.sum()
    torch.testing.assert_close(got, torch.tensor([2.0, 3.0]))  # one agreeing model per entry
    assert w[0] != w[2]  # the weights differ, yet a lone agreeing model keeps its own value


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.2])
def test_sce_matches_the_reference_re_statement_of_mergekit(select_topk):
    base, deltas = random_task_vectors(n=4, size=64 * 48)
    got = run_method("sce", base, base + deltas, select_topk=select_topk)
    expected = base + reference_sce(deltas.reshape(4, 64, 48), select_topk).reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
