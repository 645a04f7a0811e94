"""Merge math on small tensors: against PEFT's merge_utils where it has the method (unit
weights, PEFT's divisor), against hand-computed answers, and against plain re-statements of
mergekit's formulas for the conventions PEFT does not share. Cases are written with torch, as
PEFT's are; the methods take and return numpy arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from method_runner import random_task_vectors, run_method
from peft.utils import merge_utils as peft
from reference_merge import della as reference_della

from mergeflow.methods import METHODS, Chunk
from mergeflow.methods import primitives as P
from mergeflow.methods.model_stock import interpolation_ratio
from mergeflow.methods.slerp import slerp_coefficients


def merge_chunk(name: str, base, models, params):
    """One registered method's merge on torch inputs, with its parameters given in full."""
    params = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    chunk = Chunk("w", 0, None if base is None else base.numpy().copy(), models.numpy().copy(), params)
    return torch.from_numpy(METHODS[name].merge(chunk))


def dare_dropped(deltas, density, seed):
    """Task vectors after our DARE step, as dare_ties/dare_linear see them: each model alone
    over a zero base with weight 1, and its own stream key."""
    dens = np.array([density], np.float32)
    return torch.stack([
        torch.from_numpy(P.merge_task_vectors(
            delta.view(1, -1).numpy(), np.zeros(delta.numel(), np.float32), np.ones(1, np.float32),
            consensus=False, normalize=False, lam=1.0, keys=[P.dare_key(seed, "w", i)], density=dens,
            scale=1 / dens,
        ))
        for i, delta in enumerate(deltas)
    ])  # fmt: skip


# --- against PEFT (unit weights; continuous values, so no magnitude ties) -------------------


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_ties_matches_peft(density):
    base, deltas = random_task_vectors()
    expected = peft.ties(list(deltas), torch.ones(4), density)
    got = run_method("ties", base, base + deltas, density=density) - base
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_matches_peft_with_weights():
    base, deltas = random_task_vectors()
    weights = torch.tensor([0.5, 1.5, -0.25, 2.0])
    expected = peft.task_arithmetic(list(deltas), weights)
    params = {"weight": weights, "lambda": 1.0, "normalize": False}
    got = merge_chunk("task_arithmetic", base, base + deltas, params) - base
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_magnitude_trim_matches_peft_prune():
    _, deltas = random_task_vectors()
    for row in deltas:
        threshold = P.magnitude_threshold(P.Magnitudes.of(row.numpy()), 0.3)
        ours = row.masked_fill(row.abs() < threshold, 0)
        torch.testing.assert_close(ours, peft.prune(row, 0.3, method="magnitude"))


@pytest.mark.parametrize("normalize", [True, False])
def test_dare_ties_consensus_matches_peft_on_the_same_drop_masks(normalize):
    """PEFT draws DARE masks from the global RNG; feed its sign election and disjoint merge
    our dropped task vectors, then compare with our whole dare_ties method."""
    base, deltas = random_task_vectors()
    dropped = dare_dropped(deltas, 0.4, seed=7)
    mask = peft.calculate_majority_sign_mask(dropped, method="total")
    expected = peft.disjoint_merge(dropped, mask) if normalize else (dropped * mask).sum(0)
    got = run_method("dare_ties", base, base + deltas, density=0.4, seed=7, normalize=normalize) - base
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_dare_linear_matches_peft_formula_on_the_same_drop_masks():
    base, deltas = random_task_vectors()
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    dropped = dare_dropped(deltas, 0.3, seed=0)
    expected = peft.task_arithmetic(list(dropped), weights)
    params = {
        "weight": weights,
        "density": torch.full((4,), 0.3),
        "lambda": 1.0,
        "normalize": False,
        "rescale": True,
        "seed": 0,
        "int8_mask": False,
    }
    got = merge_chunk("dare_linear", base, base + deltas, params) - base
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- hand-computed answers -------------------------------------------------------------------

TAUS = torch.tensor([[3.0, -1.0, 0.5, -2.0], [-2.0, 2.0, 0.1, -1.0], [1.0, -3.0, -0.2, 0.0]])


def test_ties_sign_conflicts_without_trimming():
    # sums [2, -2, 0.4, -3] elect [+, -, +, -]; agreeing means: (3+1)/2, (-1-3)/2, (0.5+0.1)/2,
    # (-2-1)/2 - the zero in the last column is not a vote and not in the divisor.
    got = run_method("ties", torch.zeros(4), TAUS.clone(), density=1.0)
    torch.testing.assert_close(got, torch.tensor([2.0, -2.0, 0.3, -1.5]))


def test_ties_trims_then_elects():
    # density 0.5 keeps 2 of 4 per model: [3,0,0,-2], [-2,2,0,0], [1,-3,0,0]; sums [2,-1,0,-2]
    # elect [+,-,+,-] (0 counts as +); column 2 has no survivors and stays 0.
    got = run_method("ties", torch.zeros(4), TAUS.clone(), density=0.5)
    torch.testing.assert_close(got, torch.tensor([2.0, -3.0, 0.0, -2.0]))


def test_ties_lambda_scales_after_the_disjoint_mean():
    got = run_method("ties", torch.ones(4), 1 + TAUS, density=1.0, **{"lambda": 0.5})
    torch.testing.assert_close(got, 1 + 0.5 * torch.tensor([2.0, -2.0, 0.3, -1.5]))


def test_ties_weights_apply_before_sign_election_mergekit_convention():
    # Weighted [3w, ...]: with weights (1, 4, 1) model 2 outvotes the rest in column 0:
    # 3 - 8 + 1 < 0 so the elected sign is -, and the divisor is model 2's weight alone.
    weights = np.array([1.0, 4.0, 1.0], np.float32)
    merged = P.merge_task_vectors(
        TAUS.numpy(), np.zeros(4, np.float32), weights, consensus=True, normalize=True, lam=1.0
    )
    assert merged[0] == pytest.approx(-8.0 / 4.0)


def test_magnitude_ties_at_the_threshold_are_all_kept():
    delta = torch.tensor([1.0, 1.0, 1.0, 0.5])
    # k = 2, but three entries equal the 2nd largest
    threshold = P.magnitude_threshold(P.Magnitudes.of(delta.numpy()), 0.5)
    assert threshold == 1.0
    assert int((delta.abs() >= threshold).sum()) == 3


def test_magnitude_keeps_at_least_one_entry():
    delta = torch.tensor([0.1, -0.4, 0.2])
    # floor(0.3) = 0, raised to 1
    assert P.magnitude_threshold(P.Magnitudes.of(delta.numpy()), 0.1) == pytest.approx(0.4)


def test_breadcrumbs_band_drops_largest_gamma_and_smallest():
    delta = torch.arange(1, 11, dtype=torch.float32) / 10  # 0.1 .. 1.0
    low, high = P.breadcrumbs_bounds(P.Magnitudes.of(delta.numpy()), density=0.5, gamma=0.1)
    kept = delta[(delta >= low) & (delta <= high)]
    torch.testing.assert_close(kept, torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9]))


def test_breadcrumbs_method_on_a_known_case():
    delta = torch.arange(1, 11, dtype=torch.float32) / 10
    got = run_method("breadcrumbs", torch.zeros(10), delta.view(1, -1).clone(), density=0.5, gamma=0.1)
    expected = torch.where((delta >= 0.45) & (delta <= 0.95), delta, 0.0)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_all_zero_task_vectors_give_the_base(name):
    base = torch.randn(64, generator=torch.Generator().manual_seed(3))
    n = min(3, METHODS[name].max_models or 3)
    params = {"t": 0.3} if METHODS[name].param("t") is not None else {}
    if METHODS[name].param("density") is not None:
        params["density"] = 0.5
    got = run_method(name, base, base.repeat(n, 1), **params)
    torch.testing.assert_close(got, base)


def test_average_is_the_weighted_mean():
    models = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    got = run_method("average", torch.zeros(2), models.clone())
    torch.testing.assert_close(got, torch.tensor([2.0, 4.0]))
    weights = {"weight": torch.tensor([3.0, 1.0]), "normalize": True}
    got = merge_chunk("average", None, models, weights)
    torch.testing.assert_close(got, torch.tensor([1.5, 3.0]))


def test_average_of_bfloat16_models_is_their_float32_sum_in_model_order_rounded_once():
    # No base is read: the weighted sum of the models themselves, bit for bit what a float32
    # loop over the models gives, divided by the summed weights and rounded to bfloat16 once.
    generator = torch.Generator().manual_seed(5)
    models = (torch.randn(3, 10_000, generator=generator) * 0.02).to(torch.bfloat16)
    models[:, :2] = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])  # sums to zero
    weights = torch.tensor([0.5, 1.5, 2.0])
    total = torch.zeros(models.shape[1])
    for model, weight in zip(models, weights, strict=True):
        total += model.float() * weight
    expected = (total / weights.sum()).to(torch.bfloat16)
    bits = models.view(torch.int16).numpy().view(np.uint16).copy()
    params = {"weight": weights.numpy(), "normalize": True}
    got = METHODS["average"].merge(Chunk("w", 0, None, bits, params, storage=np.uint16))
    assert np.array_equal(got, expected.view(torch.int16).numpy().view(np.uint16))


def test_average_of_float32_models_is_mergekits_linear_bit_for_bit():
    # mergekit's linear adds each weighted model with torch's addcmul_, a fused multiply-add:
    # one rounding per term. Two (a product, then a sum) differed from it in a third of these entries.
    generator = torch.Generator().manual_seed(6)
    models = torch.randn(3, 100_000, generator=generator)
    weights = torch.tensor([0.3, 0.7, 1 / 3])
    total = torch.zeros(models.shape[1])
    for model, weight in zip(models, weights, strict=True):
        total.addcmul_(model, weight)
    expected = total / weights.sum()
    params = {"weight": weights.numpy(), "normalize": True}
    got = METHODS["average"].merge(Chunk("w", 0, None, models.numpy().copy(), params))
    assert np.array_equal(got, expected.numpy())


def test_model_stock_ratio_known_cases():
    orthogonal = np.eye(2)
    assert interpolation_ratio(orthogonal) == 0.0  # cos 0 -> t 0: stay at the base
    parallel = np.ones((2, 2))
    assert interpolation_ratio(parallel) == pytest.approx(1.0)  # cos 1 -> t 1: the average
    # three models at cos 0.5: t = 3·0.5 / (1 + 2·0.5) = 0.75
    gram = np.full((3, 3), 0.5) + 0.5 * np.eye(3)
    assert interpolation_ratio(gram) == pytest.approx(0.75)


def test_model_stock_method_interpolates_towards_the_average():
    base = torch.zeros(2)
    models = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # cos = 4/5 -> t = 2·0.8/1.8
    t = 2 * 0.8 / 1.8
    torch.testing.assert_close(run_method("model_stock", base, models), t * models.mean(0))


def test_slerp_quarter_circle():
    base, other = torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 1.0]])
    got = run_method("slerp", base, other, t=0.5)
    torch.testing.assert_close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    torch.testing.assert_close(run_method("slerp", base, other, t=0.0), base)
    torch.testing.assert_close(run_method("slerp", base, other, t=1.0), other[0])


def test_slerp_falls_back_to_lerp_for_parallel_tensors():
    gram = np.array([[4.0, 8.0], [8.0, 16.0]])  # θ1 = 2·θ0
    assert slerp_coefficients(gram, 0.25) == (0.75, 0.25)


def test_task_arithmetic_normalize_divides_by_summed_weights():
    base, deltas = random_task_vectors(n=2, size=8)
    got = run_method("task_arithmetic", base, base + deltas, normalize=True, weight=2.0)
    torch.testing.assert_close(got, base + deltas.mean(0))


def test_rescale_restores_the_l1_norm_of_trimmed_task_vectors():
    base, deltas = random_task_vectors(n=1, size=1000)
    got = run_method("ties", base, base + deltas, density=0.2, rescale=True) - base
    assert got.abs().sum().item() == pytest.approx(deltas.abs().sum().item(), rel=1e-4)
    assert int((got != 0).sum()) == 200


# --- DELLA ----------------------------------------------------------------------------------


def della_chances(taus, row_length, density, epsilon):
    n = len(taus)
    models = np.asarray(taus, np.float32).reshape(n, -1)
    full = [np.float32(density)] * n, [np.float32(epsilon)] * n
    return P.della_chances(models, np.zeros(models.shape[1], np.float32), row_length, *full)


def test_della_chances_rise_with_magnitude_rank_within_each_row():
    # |τ| ranks in the first row: 0.1 → 0, 0.2 → 1, 0.3 → 2, 0.4 → 3; chances 0.2 + 0.6·r/3.
    chances = della_chances([[0.1, -0.4, 0.3, 0.2, 5.0, -6.0, 7.0, 0.0]], 4, density=0.5, epsilon=0.3)
    expected = [[0.2, 0.8, 0.6, 0.4, 0.4, 0.6, 0.8, 0.2]]
    np.testing.assert_allclose(chances, expected, rtol=1e-6)


def test_della_chances_rank_equal_magnitudes_by_position_and_single_elements_at_density():
    np.testing.assert_allclose(della_chances([[1.0, -1.0, 1.0]], 3, 0.5, 0.25), [[0.25, 0.5, 0.75]])
    np.testing.assert_allclose(della_chances([[3.0, -2.0]], 1, 0.5, 0.25), [[0.5, 0.5]])
    np.testing.assert_array_equal(della_chances([[3.0, -2.0, 1.0]], 3, 1.0, 0.25), [[1.0, 1.0, 1.0]])


@pytest.mark.parametrize("row_length", [2, 3, 17, 1024])
def test_della_chances_match_a_stable_sort_on_rows_with_many_ties(row_length):
    g = np.random.default_rng(row_length)
    models = g.normal(size=(3, 20 * row_length)).astype(np.float32)
    models[1] = np.round(models[1] * 4) / 4  # few distinct magnitudes
    models[2, ::3] = 0.0
    base = g.normal(size=20 * row_length).astype(np.float32)
    density, epsilon = np.float32([0.5, 0.3, 0.4]), np.float32([0.2, 0.1, 0.15])
    expected = np.empty_like(models)
    for i, model in enumerate(models):
        for first in range(0, model.size, row_length):
            magnitudes = np.abs(model[first : first + row_length] - base[first : first + row_length])
            lowest, spread = float(density[i]) - float(epsilon[i]), 2 * float(epsilon[i])
            for rank, j in enumerate(np.argsort(magnitudes, kind="stable")):
                expected[i, first + j] = np.float32(lowest + spread * (rank / (row_length - 1)))
    got = P.della_chances(models, base, row_length, density, epsilon)
    np.testing.assert_array_equal(got, expected)


def test_della_keeps_about_density_of_each_rank_band():
    g = torch.Generator().manual_seed(4)
    base, tau = torch.zeros(100_000), torch.randn(1, 100_000, generator=g)
    merged = run_method("della_linear", base, tau, density=0.4, epsilon=0.2, rescale=False)
    kept = merged != 0
    order = torch.argsort(tau[0].abs())
    smallest, largest = kept[order[:10_000]].float().mean(), kept[order[-10_000:]].float().mean()
    assert abs(float(kept.float().mean()) - 0.4) < 0.01
    assert abs(float(smallest) - 0.22) < 0.02 and abs(float(largest) - 0.58) < 0.02
    torch.testing.assert_close(merged[kept], tau[0][kept])  # not rescaled


def test_della_rescaling_divides_each_kept_entry_by_its_chance():
    base, tau = torch.zeros(6), torch.tensor([[0.1, -0.5, 0.3, 0.2, -0.4, 0.6]])
    chances = torch.from_numpy(della_chances(tau.numpy(), 6, 0.5, 0.4))[0]
    merged = run_method("della_linear", base, tau, density=0.5, epsilon=0.4, seed=3)
    kept = merged != 0
    assert 0 < int(kept.sum()) < 6
    torch.testing.assert_close(merged[kept], (tau[0] * (1.0 / chances))[kept])


def test_della_with_zero_epsilon_is_dare():
    base, deltas = random_task_vectors()
    della = run_method("della_linear", base, base + deltas, density=0.3, epsilon=0.0, seed=5)
    dare = run_method("dare_linear", base, base + deltas, density=0.3, seed=5)
    assert torch.equal(della, dare)


@pytest.mark.parametrize("normalize", [True, False])
def test_della_consensus_matches_peft_on_the_reference_pruning(normalize):
    """The reference's DELLA pruning (plain torch) fed to PEFT's sign election and disjoint
    merge, against our whole della method."""
    base, deltas = random_task_vectors()
    pruned = torch.stack([reference_della(tau, 0.5, 0.15, 2, "w", i) for i, tau in enumerate(deltas)])
    mask = peft.calculate_majority_sign_mask(pruned, method="total")
    expected = peft.disjoint_merge(pruned, mask) if normalize else (pruned * mask).sum(0)
    got = run_method("della", base, base + deltas, density=0.5, seed=2, normalize=normalize) - base
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_nearswap_takes_close_values_whole_and_moves_less_towards_far_ones():
    base = torch.zeros(4)
    other = torch.tensor([[0.5, 2.0, 1e-7, -4.0]])
    # w = t / |θ1 − θ0| capped at 1: 1, 0.5, 1 (the distance floors at 1e-6), 0.25
    got = run_method("nearswap", base, other, t=1.0)
    torch.testing.assert_close(got, torch.tensor([0.5, 1.0, 1e-7, -1.0]))
