"""nuslerp, multislerp and karcher on small tensors: hand-computed cases on the circle,
mergekit's edge cases, and the whole methods against step-by-step re-statements of mergekit's
code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from method_runner import random_task_vectors, run_method
from reference_merge import karcher as reference_karcher
from reference_merge import multislerp as reference_multislerp
from reference_merge import nuslerp as reference_nuslerp

from mergeflow.errors import ConfigError
from mergeflow.methods.spherical import karcher_coefficients

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_multislerp_of_orthogonal_task_vectors_is_their_normalised_bisector():
    base = torch.tensor([5.0, -5.0])
    got = run_method("multislerp", base, torch.stack([base + E1, base + 3 * E2]))
    # direction: the mean of the unit vectors, (1, 1)/√2; length: the mean norm, 2
    torch.testing.assert_close(got, base + 2 * (E1 + E2) / math.sqrt(2))


def test_multislerp_weights_tilt_the_direction_and_the_length():
    got = run_method("multislerp", torch.zeros(2), torch.stack([E1, 3 * E2]), weight=torch.tensor([3.0, 1.0]))
    direction = 0.75 * E1 + 0.25 * E2
    torch.testing.assert_close(got, (0.75 * 1 + 0.25 * 3) * direction / direction.norm())


def test_multislerp_of_one_model_is_that_model():
    base, model = torch.tensor([1.0, 2.0]), torch.tensor([[4.0, -1.0]])
    torch.testing.assert_close(run_method("multislerp", base, model), model[0])


def test_multislerp_of_two_opposite_task_vectors_falls_back_to_their_weighted_sum():
    got = run_method("multislerp", torch.zeros(2), torch.stack([E1, -3 * E1]))  # unit vectors cancel
    torch.testing.assert_close(got, 0.5 * E1 - 0.5 * 3 * E1)


def test_multislerp_of_more_models_that_cancel_is_refused_naming_the_tensor():
    models = torch.stack([E1, -E1, E1, -E1])
    with pytest.raises(ConfigError, match="tensor 'w': the weighted mean of the models' directions is zero"):
        run_method("multislerp", torch.zeros(2), models)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_the_reference_re_statement_of_mergekit(with_base):
    base, deltas = random_task_vectors(n=3, size=512)
    weights = torch.tensor([0.5, 1.0, 2.0])
    models = base + deltas
    if with_base:
        got = run_method("multislerp", base, models, weight=weights)
        expected = reference_multislerp(base, models, weights)
    else:  # no base: the models themselves are the vectors (run_method's base is ignored)
        got = run_method("multislerp", None, models, weight=weights)
        expected = reference_multislerp(None, models, weights)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_karcher_of_two_points_is_the_geodesic_midpoint_at_their_mean_norm():
    got = run_method("karcher", E1, (3 * E2)[None])  # the base is one of the points
    torch.testing.assert_close(got, 2 * (E1 + E2) / math.sqrt(2))


def test_karcher_of_points_on_an_arc_is_the_middle_one():
    # three unit vectors at 0, 60 and 120 degrees: the Karcher mean is at 60, not the chord mean
    angles = torch.tensor([0.0, math.pi / 3, 2 * math.pi / 3])
    points = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    got = run_method("karcher", points[0], points[1:])
    torch.testing.assert_close(got, points[1], rtol=1e-5, atol=1e-6)


def test_karcher_edge_cases_follow_mergekit():
    assert karcher_coefficients(np.array([[4.0]]), 10, 1e-5).tolist() == [1.0]  # one point: itself
    assert karcher_coefficients(np.zeros((2, 2)), 10, 1e-5).tolist() == [0.0, 0.0]  # all zero


@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_karcher_matches_the_reference_re_statement_of_mergekit(max_iter):
    _, deltas = random_task_vectors(n=4, size=512, seed=3)
    points = deltas + 0.5  # in one half-space, so the mean is well defined
    got = run_method("karcher", points[0], points[1:], max_iter=max_iter)
    expected = reference_karcher(points, max_iter=max_iter)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("weights", "t"), [((1.0, 1.0), 0.5), ((1.0, 3.0), 0.75), ((1.0, -1.0), 0.5)])
def test_nuslerp_takes_t_from_the_weights(weights, t):
    base = torch.tensor([2.0, 1.0])
    got = run_method("nuslerp", base, torch.stack([base + E1, base + E2]), weight=torch.tensor(weights))
    # a quarter circle: sin((1 − t)·π/2)·e1 + sin(t·π/2)·e2 (weights summing to ~0 give t = 1/2)
    expected = base + math.sin((1 - t) * math.pi / 2) * E1 + math.sin(t * math.pi / 2) * E2
    torch.testing.assert_close(got, expected)


def test_nuslerp_of_parallel_task_vectors_is_linear():
    got = run_method("nuslerp", torch.zeros(2), torch.stack([E1, 3 * E1]), weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(got, 0.25 * E1 + 0.75 * 3 * E1)


@pytest.mark.parametrize(
    ("shape", "row_wise", "flatten"),
    [((8, 16), False, True), ((8, 16), False, False), ((8, 16), True, False), ((4, 3, 5), True, False),
     ((4, 3, 5), False, False), ((12,), True, False)],
)  # fmt: skip
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_the_reference_re_statement_of_mergekit(shape, row_wise, flatten, with_base):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    models = base + torch.randn((2, *shape), generator=g)
    weights = torch.tensor([0.3, 0.9])
    params = dict(weight=weights, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    got = run_method("nuslerp", base if with_base else None, models, **params)
    expected = reference_nuslerp(base if with_base else None, models, weights, row_wise, flatten)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
