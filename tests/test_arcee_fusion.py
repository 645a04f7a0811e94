"""Arcee Fusion: a hand-computed case, and the reference re-statement of mergekit's formula with
exact quartiles (tests/reference_merge.py), in float32 and as bfloat16 bit patterns."""

from __future__ import annotations

import pytest
import torch
from method_runner import run_method
from reference_merge import arcee_fusion


def test_only_changes_whose_importance_is_an_upper_outlier_are_taken():
    # One row of 8 entries: KL(p ‖ q) is one number, so importance ranks the entries by |τ|.
    base = torch.zeros(8)
    taus = torch.tensor([0.1, -0.1, 0.1, 0.1, -0.1, 0.1, 0.1, 3.0])
    merged = run_method("arcee_fusion", base, (base + taus)[None])
    # sorted |τ|: seven of 0.1 and 3.0; Q1 = Q2 = Q3 = 0.1 (indices 1, 3, 5): threshold 0.1·KL,
    # which every entry reaches
    assert torch.equal(merged, base + taus)
    taus = torch.tensor([0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, 3.0])
    merged = run_method("arcee_fusion", base, (base + taus)[None])
    # Q1 = 0.2, Q2 = 0.4, Q3 = 0.6 times KL: threshold (0.4 + 1.5·0.4)·KL = 1.0·KL
    assert merged.tolist() == [0.0] * 7 + [3.0]


def test_a_change_that_only_shifts_a_row_is_not_taken_however_large():
    # softmax ignores a shift: rows 4-7 move by 1.0 but stay the same distribution (KL ~ 0),
    # while rows 0-3 change by less and become different distributions.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, generator=g)
    model = base.clone()
    model[:4] += 0.5 * torch.randn(4, 16, generator=g)
    model[4:] += 1.0
    merged = run_method("arcee_fusion", base, model[None])
    assert torch.equal(merged[4:], base[4:])
    assert (merged[:4] != base[:4]).any()


@pytest.mark.parametrize("shape", [(300,), (64, 96), (7, 5, 33)])
def test_arcee_fusion_matches_the_reference(shape):
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(*shape, generator=g)
    model = base + 0.3 * torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < 0.5)
    ours = run_method("arcee_fusion", base, model[None])
    expected = arcee_fusion(base, model)
    assert torch.equal(ours, expected)
    assert 0 < int((ours != base).sum()) < base.numel() // 2


def test_bfloat16_bit_patterns_merge_as_their_float32_values():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(32, 128, generator=g).to(torch.bfloat16)
    model = (base.float() + 0.2 * torch.randn(32, 128, generator=g)).to(torch.bfloat16)
    as_stored = run_method("arcee_fusion", base.view(torch.uint16), model.view(torch.uint16)[None])
    widened = run_method("arcee_fusion", base.float(), model.float()[None])
    assert torch.equal(as_stored, widened)
