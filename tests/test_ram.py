"""RAM and RAM+ (tensor-local): hand-computed cases, and the reference re-statement of mergekit's
formulas (tests/reference_merge.py) on sparse task vectors, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from method_runner import run_method
from reference_merge import ram

ZERO = torch.zeros(4)


def test_a_change_only_one_model_makes_is_kept_whole_and_shared_ones_are_averaged():
    taus = torch.tensor([[1.0, 4.0, 0.0, 2.0], [3.0, 0.0, 0.0, -6.0]])
    assert run_method("ram", ZERO, taus).tolist() == [2.0, 4.0, 0.0, -2.0]


def test_changes_up_to_epsilon_count_as_none():
    taus = torch.tensor([[0.5, 0.2, 0.1, 2.0], [0.3, 0.6, 0.1, 2.0]])
    # |τ| ≤ 0.25: dropped; 0.3 and 0.5 are the only changes left in the first entry
    assert run_method("ram", ZERO, taus, epsilon=0.25).tolist() == pytest.approx([0.4, 0.6, 0.0, 2.0])


def test_ramplus_scales_unique_changes_by_the_models_overlap_ratio():
    taus = torch.tensor(
        [
            [1.0, 1.0, 1.0, 4.0],  # shares 3 entries, alone in 1: ρ = 3, clamped to α = 0.2
            [2.0, 2.0, 2.0, 0.0],  # shares 3, alone in none: its scale never applies
            [1.0, 0.0, 0.0, 0.0],
        ]
    )
    merged = run_method("ramplus_tl", ZERO, taus)
    assert merged.tolist() == pytest.approx([4 / 3, 1.5, 1.5, 4.0 * 1.02])
    merged = run_method("ramplus_tl", ZERO, taus, r=0.5, alpha=10.0)
    assert merged[3].item() == pytest.approx(4.0 * (1 + 0.5 * 3))


def test_ramplus_of_models_without_shared_changes_is_ram():
    taus = torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, -1.0]])
    assert torch.equal(run_method("ramplus_tl", ZERO, taus), run_method("ram", ZERO, taus))


def test_no_model_changing_an_entry_leaves_the_base():
    base = torch.tensor([1.0, -2.0, 3.0, 0.5])
    models = base + torch.tensor([[0.0, 1e-6, 0.0, 0.0], [0.0, 0.0, -1e-6, 1.0]])
    assert run_method("ram", base, models).tolist() == [1.0, -2.0, 3.0, 1.5]


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_matches_the_reference_on_sparse_task_vectors(method, n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(32, 48, generator=g)
    taus = torch.randn(n, 32, 48, generator=g) * (torch.rand(n, 32, 48, generator=g) < 0.4)
    models = base + taus
    ours = run_method(method, base, models, epsilon=0.1)
    expected = base + ram(models - base, 0.1, plus=method == "ramplus_tl")
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert 0 < int(((taus.abs() > 0.1).sum(0) == 1).sum()) < taus[0].numel()  # both cases occur


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_bfloat16_bit_patterns_merge_as_their_float32_values(method):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4096, generator=g).to(torch.bfloat16)
    taus = torch.randn(3, 4096, generator=g) * (torch.rand(3, 4096, generator=g) < 0.5)
    models = (base.float() + taus).to(torch.bfloat16)
    as_stored = run_method(method, base.view(torch.uint16), models.view(torch.uint16), epsilon=0.01)
    widened = run_method(method, base.float(), models.float(), epsilon=0.01)
    assert torch.equal(as_stored, widened)
