"""Fingerprints: noise floor far below the tolerance, drift, swaps and NaN always seen."""

from __future__ import annotations

import math

import pytest
import torch

import revgrad
from revgrad.engine.checks import relative_error
from revgrad.ops.fingerprint import CHUNK, fingerprint, fingerprint_parts, sign_tables, signs

DIMS = [1, 7, CHUNK, CHUNK + 3, 5 * 7 * 9, 65536 + 11]


@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_noise_floor_ten_times_below_default_tol(dim, dtype):
    """The fingerprint's own error (vs the exact float64 projection) sits >= 10x below tol."""
    torch.manual_seed(dim)
    worst = 0.0
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(16, dim, dtype=torch.float64) * scale
        x[:, : dim // 3] += 5 * scale  # a mean offset makes float32 sums cancel
        x = x.to(dtype)
        exact = x.to(torch.float64) @ signs(dim)
        worst = max(worst, relative_error(fingerprint(x), exact).item())
    assert worst * 10 <= revgrad.default_tol(dtype), f"noise floor {worst:.3g}"


def test_error_estimates_relative_distance():
    """||f(x') - f(x)|| / ||f(x)|| tracks ||x' - x|| / ||x|| (Johnson-Lindenstrauss, m = 8)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3000, dtype=torch.float64)
    for rel in (1e-6, 1e-3, 1e-1):
        drift = torch.randn_like(x)
        drift *= rel * x.norm(dim=1, keepdim=True) / drift.norm(dim=1, keepdim=True)
        err = relative_error(fingerprint(x + drift), fingerprint(x)).item()
        assert rel / 4 <= err <= rel * 4, (rel, err)


def test_single_element_and_single_sample_drift_is_seen():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 9, 9)
    bad = x.clone()
    bad[5, 2, 3, 4] += 0.05 * x[5].norm()  # one element of one sample
    assert relative_error(fingerprint(bad), fingerprint(x)).item() > 1e-2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_never_passes(value):
    x = torch.randn(4, 300)
    bad = x.clone()
    bad[2, 17] = value
    err = relative_error(fingerprint(bad), fingerprint(x))
    assert not (err <= 1e30)


def test_zero_sample_is_no_false_alarm():
    x = torch.randn(4, 300)
    x[1] = 0
    noisy = x.clone()
    noisy[1] = 1e-12
    assert relative_error(fingerprint(noisy), fingerprint(x)).item() < 1e-5


def test_identical_inputs_give_identical_fingerprints_and_no_global_rng_use():
    state = torch.get_rng_state()
    x = torch.randn(3, 5, 7, 9)
    torch.set_rng_state(state)
    a, b = fingerprint(x), fingerprint(x.clone())
    assert torch.equal(a, b) and a.shape == (3, 8) and a.dtype == torch.float64
    torch.set_rng_state(state)
    assert torch.equal(torch.randn(3, 5, 7, 9), x)  # the generator did not move


def test_signs_match_fingerprint_in_float64():
    x = torch.randn(2, CHUNK * 3 + 5, dtype=torch.float64)
    torch.testing.assert_close(fingerprint(x), x @ signs(x.shape[1]), rtol=1e-12, atol=1e-12)
    # Continuous weights: products of two factors with magnitudes in [0.5, 1.5], no two rows alike.
    s = signs(1000)
    assert s.abs().min().item() >= 0.25 and s.abs().max().item() <= 2.25
    assert s.unique(dim=0).shape[0] == 1000
    # The tables are shared: a shorter sample's weights are a longer one's first rows, in every dtype.
    torch.testing.assert_close(signs(300, dtype=torch.float32), signs(1000)[:300].float(), rtol=0, atol=0)
    within, flips = sign_tables(1000, torch.device("cpu"))
    assert within.dtype == flips.dtype == torch.float32 and within.shape == (CHUNK, 8) and flips.shape == (8, 8)


# A swap of elements a and b moves the fingerprint by (x_b - x_a) * (s[a] - s[b]) and the sample by
# |x_b - x_a| * sqrt(2), so the fingerprint measures it at
#     ||s[a] - s[b]|| / sqrt(2 m E[s^2])  *  sqrt(m E[s^2]) ||x|| / ||f(x)||
# of its true relative distance. The second factor depends on the sample only (1 / sqrt(chi2_8 / 8)
# for a random one: 0.6 to 2.2 for all but 2 % of samples). With ±1 weights two rows coincide for one
# pair in 2^m = 256: a blind spot, ratio 0. With every factor of s a random sign times a magnitude
# uniform in [0.5, 1.5], the first factor is ~1 and falls below 1/10 for about one pair in 1e5, below
# 1/20 for about one in 1e7 (Monte Carlo over the distribution, for pairs in the same chunk or at the
# same offset of two chunks, which share a factor; other pairs fare better). The fixed tables give at
# least 0.08 for every pair in the same chunk and 0.05 for every pair at the same offset, up to
# D = 3e5. Measured here: at least 0.086 (D = 4096, a same-offset pair); ±1 tables give 0 at every D.
SWAP_FRACTION = 1 / 20


def _swap_pairs(dim: int, gen: torch.Generator) -> torch.Tensor:
    """``[P, 2]`` pairs: every pair for small samples, else thousands of random pairs plus every
    adjacent pair and every pair at the same offset in different chunks."""
    if dim * (dim - 1) // 2 <= 80_000:
        return torch.combinations(torch.arange(dim), 2)
    random = torch.randint(0, dim, (6000, 2), generator=gen)
    random = random[random[:, 0] != random[:, 1]]
    adjacent = torch.stack([torch.arange(dim - 1), torch.arange(1, dim)], dim=1)
    chunk_pairs = torch.combinations(torch.arange(-(-dim // CHUNK)), 2)  # [c1 < c2]
    a = chunk_pairs[:, :1] * CHUNK + torch.arange(CHUNK)  # same offset, both chunks
    b = chunk_pairs[:, 1:] * CHUNK + torch.arange(CHUNK)
    same_offset = torch.stack([a.flatten(), b.flatten()], dim=1)
    same_offset = same_offset[same_offset[:, 1] < dim]
    return torch.cat([random, adjacent, same_offset])


@pytest.mark.parametrize("dim", [64, 200, 3 * CHUNK + 5, 4096], ids=lambda d: f"D{d}")
def test_swapped_elements_are_seen(dim):
    """A rebuilt sample with two elements swapped is measured at >= 1/20 of its true distance."""
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(dim, generator=gen)
    pairs = _swap_pairs(dim, gen)
    if dim == 4096:  # the sizes the pairs were meant to cover
        assert pairs.shape[0] > 60_000
    stored = fingerprint(x[None])
    # Swaps closer than 10x the float32 tolerance say nothing (and rounding noise would blur them).
    considered, worst = 0, (math.inf, None)
    for batch in pairs.split(4096):
        swapped = x.repeat(batch.shape[0], 1)
        rows = torch.arange(batch.shape[0])
        swapped[rows, batch[:, 0]], swapped[rows, batch[:, 1]] = x[batch[:, 1]], x[batch[:, 0]]
        true = torch.linalg.vector_norm((swapped - x).double(), dim=1) / torch.linalg.vector_norm(x.double())
        measured = torch.vmap(lambda f: relative_error(f[None], stored))(fingerprint(swapped))
        keep = true >= 1e-4
        considered += int(keep.sum())
        ratio = measured[keep] / true[keep]
        if ratio.numel() and ratio.min().item() < worst[0]:
            i = int(ratio.argmin())
            worst = (ratio[i].item(), batch[keep][i].tolist())
    assert considered >= 0.98 * pairs.shape[0], f"only {considered} of {pairs.shape[0]} swaps are measurable"
    assert worst[0] >= SWAP_FRACTION, (
        f"D={dim}: swapping elements {worst[1]} is measured at {worst[0]:.3g} of its true distance "
        f"(< {SWAP_FRACTION:.3g}): a near blind spot of the fingerprint weights"
    )


def test_autocast_does_not_change_the_fingerprint():
    """The engine fingerprints inside the caller's autocast region: the products must stay float32
    (a bf16 matmul would round x, the weights and the chunk sums: ~3e-3 relative)."""
    x = torch.randn(4, 8, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fingerprint(x)
        parts = fingerprint_parts(x[:, :4], x[:, 4:])  # halves of one whole chunk each: summed partials
    assert torch.equal(inside, fingerprint(x))
    torch.testing.assert_close(parts, fingerprint(x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sizes", [(1, 1), (3, 5), (32, 32), (64, 64), (5, 60, 7), (100, 28)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_parts_of_one_chunk_equal_the_whole(sizes, dtype):
    """Parts of at most one chunk in all (small samples, the halves of every coupling of a small flow)
    take one product per part, no concatenation: the fingerprint of the whole, within the float32
    rounding of the products' sums (bf16 parts accumulate in float32, like the whole)."""
    torch.manual_seed(sum(sizes))
    parts = [torch.randn(9, n, dtype=torch.float64).to(dtype) for n in sizes]
    whole = fingerprint(torch.cat(parts, dim=1))
    got = fingerprint_parts(*parts)
    assert got.dtype == torch.float64 and got.shape == (9, 8)
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert relative_error(got, whole).item() <= tol
    # A multi-dimensional split of dim 1 (the halves of a [B, C, H, W] coupling input) is the same.
    x = torch.randn(5, 4, 2, 3, dtype=torch.float64).to(dtype)
    assert relative_error(fingerprint_parts(x[:, :2], x[:, 2:]), fingerprint(x)).item() <= tol
