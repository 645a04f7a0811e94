"""The primitives' contracts: exact selection, chunk-invariant DARE randomness, torch's
rounding to bfloat16 and float16. Cases are written with torch; the primitives take numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeflow.methods import primitives as P
from mergeflow.methods import statistic_kernels as S
from mergeflow.safetensors_io import DTYPES, dtype_of, numpy_view


def kth_largest(values: torch.Tensor, k: int) -> float:
    return P.Magnitudes.of(numpy_view(values)).kth_largest(k)


@pytest.mark.parametrize("k", [1, 7, 100_000, 300_000, 599_999, 600_000])
def test_kth_largest_is_exact(k):
    # Rounded values make many exact ties.
    values = (torch.rand(600_000, generator=torch.Generator().manual_seed(k)) * 1000).round()
    assert kth_largest(values, k) == values.sort(descending=True).values[k - 1].item()


def test_kth_largest_with_a_heavy_tail_and_a_spike_of_equal_values():
    g = torch.Generator().manual_seed(1)
    values = torch.cat([torch.randn(400_000, generator=g).abs() ** 4, torch.full((200_000,), 0.5)])
    for k in (50_000, 250_000, 450_000):
        assert kth_largest(values, k) == values.sort(descending=True).values[k - 1].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_largest_of_a_difference_is_that_of_the_float32_difference(dtype):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(300_000, generator=g).to(dtype)
    model = (base.float() + 0.01 * torch.randn(300_000, generator=g)).to(dtype)
    expected = (model.float() - base.float()).abs().sort(descending=True).values
    magnitudes = P.Magnitudes.of(numpy_view(model), numpy_view(base))
    got = torch.from_numpy(magnitudes.values())
    torch.testing.assert_close(got, (model.float() - base.float()).abs(), rtol=0, atol=0)
    for k in (1, 1234, 60_000, 299_999, 300_000):
        assert magnitudes.kth_largest(k) == expected[k - 1].item()


@pytest.mark.parametrize("n_parts", [1, 3, 7])
def test_magnitude_histograms_count_every_entry_once_whatever_the_slicing(n_parts):
    # An odd length: slices, blocks and groups all end mid-way.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(100_003, generator=g).to(torch.bfloat16)
    model = (base.float() + 0.01 * torch.randn(100_003, generator=g)).to(torch.bfloat16)
    bits = (model.float() - base.float()).abs().view(torch.int32).numpy()
    magnitudes = P.Magnitudes.of(numpy_view(model), numpy_view(base))
    top = S.magnitude_histogram(magnitudes.model, magnitudes.base, True, -1, n_parts)
    np.testing.assert_array_equal(top, np.bincount(bits >> 16, minlength=1 << 15))
    busiest = int(np.argmax(top))
    bottom = S.magnitude_histogram(magnitudes.model, magnitudes.base, True, busiest, n_parts)
    in_bin = bits[bits >> 16 == busiest]
    np.testing.assert_array_equal(bottom, np.bincount(in_bin & 0xFFFF, minlength=1 << 16))


def test_kth_largest_counts_signed_zeros_as_equal_and_nan_above_inf():
    values = torch.tensor([-0.0, 0.0, 3.0, float("inf"), float("nan"), -2.0])
    assert [kth_largest(values, k) for k in (2, 3, 4, 5, 6)] == [float("inf"), 3.0, 2.0, 0.0, 0.0]
    assert np.isnan(kth_largest(values, 1))


def test_kth_largest_rejects_k_out_of_range():
    with pytest.raises(ValueError):
        kth_largest(torch.ones(4), 0)


def test_dare_uniforms_do_not_depend_on_chunking():
    key = P.dare_key(3, "model.layers.0.mlp.up_proj.weight", 2)
    n = 200_003
    whole = P.dare_uniforms(key, 0, n)
    for chunk in (1000, 65_536, 77_777):
        pieces = np.concatenate([P.dare_uniforms(key, s, min(chunk, n - s)) for s in range(0, n, chunk)])
        np.testing.assert_array_equal(pieces, whole)


def test_dare_uniforms_look_uniform():
    u = torch.from_numpy(P.dare_uniforms(P.dare_key(0, "w", 0), 0, 1_000_000))
    assert u.min() >= 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.002)
    histogram = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert torch.allclose(histogram, torch.full((10,), 0.1), atol=0.002)
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.005  # neighbours


def test_dare_keys_differ_by_seed_tensor_and_model():
    keys = {P.dare_key(0, "a", 0), P.dare_key(1, "a", 0), P.dare_key(0, "b", 0), P.dare_key(0, "a", 1)}
    assert len(keys) == 4
    first = P.dare_uniforms(P.dare_key(0, "a", 0), 0, 1000)
    assert not np.array_equal(first, P.dare_uniforms(P.dare_key(0, "a", 1), 0, 1000))


def dare(delta: torch.Tensor, density: float, start: int = 0) -> torch.Tensor:
    """One task vector after the DARE step: a single model over a zero base, weight 1."""
    dens = np.array([density], np.float32)
    return torch.from_numpy(P.merge_task_vectors(
        delta.view(1, -1).numpy(), np.zeros(delta.numel(), np.float32), np.ones(1, np.float32),
        consensus=False, normalize=False, lam=1.0, keys=[P.dare_key(0, "w", 0)], density=dens,
        scale=1 / dens, start=start,
    ))  # fmt: skip


def test_dare_keeps_density_fraction_and_rescales():
    delta = dare(torch.ones(200_000), 0.3)
    kept = delta != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.005)
    torch.testing.assert_close(delta[kept], torch.full_like(delta[kept], 1 / 0.3))
    assert delta.mean().item() == pytest.approx(1.0, abs=0.02)  # expectation preserved


def test_dare_mask_of_a_chunk_is_the_slice_of_the_whole_mask():
    delta = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    whole = dare(delta, 0.4)
    assert torch.equal(dare(delta[30_000:70_000], 0.4, start=30_000), whole[30_000:70_000])


def test_dare_density_one_keeps_everything():
    delta = torch.arange(10.0)
    assert torch.equal(dare(delta, 1.0), delta)


def test_ordered_sum_is_bitwise_a_left_fold():
    rows = np.random.default_rng(0).standard_normal((5, 1000), dtype=np.float32)
    expected = (((rows[0] + rows[1]) + rows[2]) + rows[3]) + rows[4]
    np.testing.assert_array_equal(P.ordered_sum(rows), expected)


def every_float32() -> torch.Tensor:
    """A sample of float32 bit patterns: random ones plus every exponent's edges, the
    rounding ties of bfloat16 and float16, subnormals, ±0, ±Inf and NaN."""
    bits = torch.randint(
        0, 2**32, (1_000_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64
    )
    edges = [
        (e << 23) | m for e in range(256) for m in (0, 1, 0x7FFF, 0x8000, 0x8001, 0x18000, 0x1000, 0x7FFFFF)
    ]
    edges += [x | 1 << 31 for x in edges]
    return torch.cat([bits, torch.tensor(edges)]).to(torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
def test_narrowing_float32_gives_the_bits_torch_gives(name):
    values = every_float32()
    expected = values.to({"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[name])
    got, non_finite = P.from_float32(values.numpy(), DTYPES[name])
    assert non_finite == int((~torch.isfinite(values)).sum())
    assert dtype_of(expected) == DTYPES[name]
    finite = torch.isfinite(expected) | torch.isinf(expected)
    np.testing.assert_array_equal(got[finite.numpy()], numpy_view(expected)[finite.numpy()])
    assert np.isnan(P.to_float32(got)[~finite.numpy()]).all()


def test_a_merge_written_as_bfloat16_gives_the_bits_torch_gives_its_float32_values():
    # The merge kernel narrows each value as it stores it; torch narrows the float32 result.
    values = every_float32()
    finite = values[torch.isfinite(values)]
    models = finite.view(1, -1).numpy()
    arguments = dict(consensus=False, normalize=False, lam=1.0)
    as_float32 = P.merge_task_vectors(
        models, np.zeros(finite.numel(), np.float32), np.ones(1, np.float32), **arguments
    )
    as_bfloat16 = P.merge_task_vectors(
        models, np.zeros(finite.numel(), np.float32), np.ones(1, np.float32), storage=np.uint16, **arguments
    )
    assert as_bfloat16.dtype == np.uint16
    np.testing.assert_array_equal(as_bfloat16, numpy_view(torch.from_numpy(as_float32).to(torch.bfloat16)))


@pytest.mark.parametrize("storage", [np.float32, np.uint16])
def test_merged_values_that_overflow_are_refused_in_either_storage(storage):
    models = np.full((2, 8), 3e38, np.float32)  # finite, but their sum is not
    with pytest.raises(P.NonFiniteOutput, match="8 merged value"):
        P.merge_task_vectors(
            models, np.zeros(8, np.float32), np.ones(2, np.float32), consensus=False, normalize=False,
            lam=1.0, storage=storage,
        )  # fmt: skip


def test_widening_bfloat16_is_exact():
    stored = every_float32().to(torch.bfloat16)
    widened = P.to_float32(numpy_view(stored))
    np.testing.assert_array_equal(widened.view(np.uint32), stored.float().numpy().view(np.uint32))
