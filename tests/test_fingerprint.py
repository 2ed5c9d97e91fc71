"""Fingerprints: noise floor far below the tolerance, drift and NaN always seen."""

from __future__ import annotations

import pytest
import torch

import revgrad
from revgrad.fingerprint import CHUNK, fingerprint, relative_error, signs

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
    s = signs(1000)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
