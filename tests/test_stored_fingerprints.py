"""Stored fingerprints (``revgrad.engine.checks.FingerprintStore``): what forward keeps of each block
input's fingerprint, and what a check measures from it.

Forward no longer keeps the float64 fingerprints but residues on a per-sample grid set by the check's
tolerance (int16 modulo 2^16, uint8 exponent code: 17 bytes per sample and block). That trades exactness for
memory, so these tests pin down what the trade must not cost:

- resolution: an exact rebuild measures at most ``sqrt(8) 2^-P <= tol / 100``, and an error up to
  ``MEASURED_EXACTLY = 20`` tol, in any direction, is measured as the float64 fingerprints would
  measure it, within ``tol / 50``;
- safety: an error far above the tolerance (random drift, growth, shrinking to 0, a sign flip, one
  element changed hugely, swapped elements or samples, NaN/Inf on either side) always fails the check,
  at every scale, including exponents outside the stored range; a row is never checked against more
  than its own tolerance (``limit``), where wrapped residues would start to pass;
- layout: 17 bytes per sample and row, float64 values below a tolerance of 1e-6, per-row grids for rows
  of different tolerances, a ``take_tensors`` / ``put_tensors`` round trip that maps rows back in
  forward order;
- the engine: what forward saves (output, the chain's input, anchors when asked for, the two store
  tensors) and gradients equal to plain autograd's, with and without a drifting inverse.

The store's error is relative to the *rebuilt* fingerprint's norm (capped at the stored scale), where
:func:`relative_error` divides by the stored one; the comparisons below use the matching reference and
bound the gap to ``relative_error`` itself (``e / (1 + e)`` to ``e / (1 - e)``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from chains import Scale
from reference import assert_rel_close, plain_chain, scalar_loss
from torch import nn

import revgrad
from revgrad.engine.anchors import regular_anchors
from revgrad.engine.checks import MEASURED_EXACTLY, FingerprintStore, _wrap, grid_bits, relative_error
from revgrad.ops.fingerprint import fingerprint

# The default tolerances of float32, float16 and bfloat16 chains (grids P = 25, 17 and 14; for 4e-3
# and 3e-2 rounding P up leaves the residues' range near its lower bound relative to the tolerance).
TOLS = [1e-5, 4e-3, 3e-2]
TOL_IDS = ["fp32-tol", "fp16-tol", "bf16-tol"]
F64 = torch.float64


# -- helpers ------------------------------------------------------------------------------------------


def _per_sample(stored: torch.Tensor, rebuilt: torch.Tensor, tol: float) -> torch.Tensor:
    """``[N]``: the store's error of each rebuilt sample, each stored and checked as a batch of its own
    (so no sample is measured against another's scale: the batch floor is tested on its own).

    ``FingerprintStore.error`` returns the largest error of a batch; to see every sample's, each is
    encoded as a one-sample row and row 0 of a one-row layout is given each row's tensors in turn
    (vmapped). Residue rows only.
    """
    layout = FingerprintStore.encode([stored[:1]], [tol])
    layout.take_tensors()
    codes, exps = FingerprintStore.encode(list(stored[:, None]), [tol] * stored.shape[0]).take_tensors()

    def one(c: torch.Tensor, e: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return layout.put_tensors((c[None], e[None])).error(0, r[None])

    return torch.vmap(one)(codes, exps, rebuilt)


def _vs_stored_norm(stored: torch.Tensor, rebuilt: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``||f' - f|| / ||f||`` per sample, as :func:`relative_error` measures float64 values."""
    return torch.vmap(lambda f, r: relative_error(r[None], f[None]))(stored, rebuilt)


def _vs_rebuilt_norm(stored: torch.Tensor, rebuilt: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``||f' - f|| / ||f'||`` per sample: what the store measures (unwrapped, uncapped)."""
    return torch.vmap(lambda f, r: relative_error(f[None], r[None]))(stored, rebuilt)


def _random_fingerprints(n: int, gen: torch.Generator, log2_scale: float = 60.0) -> torch.Tensor:
    """``[n, 8]`` Gaussian fingerprints, each sample scaled by ``2^u``, ``u`` uniform in +-log2_scale."""
    f = torch.randn(n, 8, dtype=F64, generator=gen)
    return f * torch.exp2(torch.empty(n, 1, dtype=F64).uniform_(-log2_scale, log2_scale, generator=gen))


def _directions(n: int, gen: torch.Generator, dim: int = 8) -> torch.Tensor:
    u = torch.randn(n, dim, dtype=F64, generator=gen)
    return u / torch.linalg.vector_norm(u, dim=1, keepdim=True)


def _log_uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """``[n, 1]`` values log-uniform in ``[lo, hi]``."""
    return torch.exp(torch.empty(n, 1, dtype=F64).uniform_(math.log(lo), math.log(hi), generator=gen))


def _drifted(f: torch.Tensor, rel: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``f`` moved by ``rel * ||f||`` per sample, in a random direction."""
    return f + rel * torch.linalg.vector_norm(f, dim=1, keepdim=True) * _directions(f.shape[0], gen, f.shape[1])


def _assert_measured_exactly(measured, stored, rebuilt, tol, what):
    """Errors up to 20 tol: the store measures what float64 fingerprints would, within tol / 50."""
    by_rebuilt, by_stored = _vs_rebuilt_norm(stored, rebuilt), _vs_stored_norm(stored, rebuilt)
    gap = (measured - by_rebuilt).abs()
    i = int(gap.argmax())
    assert gap[i] <= tol / 50, (
        f"{what}: measured {measured[i]:.6g}, float64 fingerprints give {by_rebuilt[i]:.6g} (tol {tol:g})"
    )
    # Against relative_error itself (stored norm): ||f'|| is within (1 +- e) ||f||.
    low, high = by_stored / (1 + by_stored) - tol / 50, by_stored / (1 - by_stored) + tol / 50
    outside = (measured < low) | (measured > high)
    assert not outside.any(), f"{what}: {int(outside.sum())} errors outside e/(1+e) .. e/(1-e) of relative_error"


# -- resolution ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tol", TOLS, ids=TOL_IDS)
def test_noise_floor_and_drifts_up_to_twenty_tol_are_measured_exactly(tol):
    """An exact rebuild measures <= sqrt(8) 2^-P (<= tol / 100, the design's resolution); drifts from
    tol / 10 to 20 tol measure what float64 fingerprints would, within tol / 50, at every sample size
    and scale, with a mean offset, and at exponents far from 0."""
    gen = torch.Generator().manual_seed(1)
    resolution = math.sqrt(8) * 2.0 ** -grid_bits(tol)
    assert resolution <= tol / 100
    for dim in (7, 300, 5000):
        for scale in (1e-3, 1.0, 1e3):
            x = torch.randn(16, dim, dtype=F64, generator=gen) * scale
            x[8:, : dim // 3] += 5 * scale  # a mean offset: fingerprints dominated by one direction
            f = fingerprint(x)
            store = FingerprintStore.encode([f], [tol])
            floor = store.error(0, f).item()
            assert floor <= resolution, f"D={dim} scale={scale:g}: exact rebuild measures {floor:.3g}"
            # The store's per-batch error is the largest per-sample one (samples of one scale: no floor).
            rebuilt = _drifted(f, _log_uniform(16, tol / 10, MEASURED_EXACTLY * tol, gen), gen)
            per_sample = _per_sample(f, rebuilt, tol)
            assert store.error(0, rebuilt).item() == per_sample.max().item()
            _assert_measured_exactly(per_sample, f, rebuilt, tol, f"D={dim} scale={scale:g}")
            # Drifts of the sample itself, each rebuilt sample's fingerprint measured as it would be.
            x_rebuilt = x + _directions(16, gen, dim) * torch.linalg.vector_norm(x, dim=1, keepdim=True) * (
                _log_uniform(16, tol / 10, 4 * tol, gen)
            )
            f_rebuilt = fingerprint(x_rebuilt)
            small = _vs_rebuilt_norm(f, f_rebuilt) <= MEASURED_EXACTLY * tol
            assert small.sum() >= 12  # the fingerprint estimates the drift within ~4x
            _assert_measured_exactly(
                _per_sample(f, f_rebuilt, tol)[small], f[small], f_rebuilt[small], tol, f"x drift D={dim}"
            )

    # Thousands of samples at scales 2^-60 .. 2^60, drifts log-uniform in tol / 10 .. 20 tol.
    f = _random_fingerprints(20_000, gen)
    rebuilt = _drifted(f, _log_uniform(20_000, tol / 10, MEASURED_EXACTLY * tol, gen), gen)
    assert _per_sample(f, f, tol).max().item() <= resolution
    _assert_measured_exactly(_per_sample(f, rebuilt, tol), f, rebuilt, tol, "random fingerprints")

    # The vmapped helper is the store itself: the same value as a one-row store per sample, bit for bit.
    for i in range(0, 20_000, 2_000):
        alone = FingerprintStore.encode([f[i : i + 1]], [tol]).error(0, rebuilt[i : i + 1])
        assert alone.item() == _per_sample(f[i : i + 1], rebuilt[i : i + 1], tol).item()


# -- safety -------------------------------------------------------------------------------------------


def _assert_all_fail(measured: torch.Tensor, stored, rebuilt, tol: float, what: str) -> None:
    """Every error whose true size exceeds tol (with a rounding margin) measures above tol."""
    true = torch.minimum(_vs_rebuilt_norm(stored, rebuilt), _vs_stored_norm(stored, rebuilt))
    large = true > tol * 1.01
    passed = large & ~(measured > tol)  # NaN would count as passed
    if passed.any():
        i = int(passed.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(passed.sum())} of {int(large.sum())} errors above tol={tol:g} pass; e.g. sample "
            f"{i}: true {true[i]:.4g}, measured {measured[i]:.4g}, stored {stored[i].tolist()}, "
            f"rebuilt {rebuilt[i].tolist()}"
        )


@pytest.mark.parametrize("tol", TOLS, ids=TOL_IDS)
def test_large_errors_never_pass(tol):
    """Monte Carlo over scales 2^-60 .. 2^60 and clamped exponents (2^+-140): errors from 20 tol to 1e6
    in random directions, growth by 1 + 20 tol .. 1e6, shrinking to 0, a sign flip, one element of the
    sample changed hugely, samples of a batch swapped: every error above tol measures above tol (wrapped
    residues land anywhere; all 8 landing near the right value has probability ~5e-13)."""
    gen = torch.Generator().manual_seed(2)
    n = 20_000
    f = torch.cat(
        [
            _random_fingerprints(n, gen),
            torch.randn(1000, 8, dtype=F64, generator=gen) * 2.0**-140,
            torch.randn(1000, 8, dtype=F64, generator=gen) * 2.0**140,
        ]
    )
    m = f.shape[0]

    rebuilt = _drifted(f, _log_uniform(m, 20 * tol, 1e6, gen), gen)
    _assert_all_fail(_per_sample(f, rebuilt, tol), f, rebuilt, tol, "random drift")

    grown = f * (1 + _log_uniform(m, 20 * tol, 1e6, gen))
    _assert_all_fail(_per_sample(f, grown, tol), f, grown, tol, "growth")

    factor = torch.empty(m, 1, dtype=F64).uniform_(0, 1 - 20 * tol, generator=gen)
    factor[::10] = 0.0  # shrunk to exactly 0
    shrunk = f * factor
    _assert_all_fail(_per_sample(f, shrunk, tol), f, shrunk, tol, "shrink")

    _assert_all_fail(_per_sample(f, -f, tol), f, -f, tol, "sign flip")

    # One element of the sample changed by 1 .. 1e6 times the sample's norm (fingerprints of x).
    x = torch.randn(4000, 300, dtype=F64, generator=gen) * torch.exp2(
        torch.empty(4000, 1, dtype=F64).uniform_(-30, 30, generator=gen)
    )
    bad = x.clone()
    rows = torch.arange(4000)
    cols = torch.randint(0, 300, (4000,), generator=gen)
    change = _log_uniform(4000, 1.0, 1e6, gen)[:, 0] * torch.linalg.vector_norm(x, dim=1)
    bad[rows, cols] += torch.where(torch.rand(4000, generator=gen) < 0.5, -change, change)
    fx, fbad = fingerprint(x), fingerprint(bad)
    assert _vs_stored_norm(fx, fbad).min() > 10 * tol  # premise: the fingerprint sees a large error
    _assert_all_fail(_per_sample(fx, fbad, tol), fx, fbad, tol, "one element changed")

    # Samples of a batch swapped (the batch as forward stores it: one row, the largest error).
    x = torch.randn(32, 300, dtype=F64, generator=gen)
    fx = fingerprint(x)
    store = FingerprintStore.encode([fx], [tol])
    assert store.error(0, fx).item() <= tol / 100
    perm = torch.arange(32)
    perm[[3, 17]] = perm[[17, 3]]
    assert store.error(0, fx[perm]).item() > tol
    rolled = fx.roll(1, dims=0)
    assert store.error(0, rolled).item() > tol
    _assert_all_fail(_per_sample(fx, rolled, tol), fx, rolled, tol, "samples rolled in the batch")


@pytest.mark.parametrize("dim", [64, 200], ids=lambda d: f"D{d}")
def test_every_swap_of_two_elements_is_detected(dim):
    """float32 samples, tol 1e-5: every swap of two elements whose true relative distance is >= 10 tol
    fails the check on the stored form (every pair: 2016 and 19900 of them), for two samples each."""
    tol = 1e-5
    pairs = torch.combinations(torch.arange(dim), 2)
    rows = torch.arange(pairs.shape[0])
    for seed in range(2):
        gen = torch.Generator().manual_seed(100 * dim + seed)
        x = torch.randn(dim, generator=gen)
        swapped = x.repeat(pairs.shape[0], 1)
        swapped[rows, pairs[:, 0]], swapped[rows, pairs[:, 1]] = x[pairs[:, 1]], x[pairs[:, 0]]
        true = torch.linalg.vector_norm((swapped - x).double(), dim=1) / torch.linalg.vector_norm(x.double())
        stored = fingerprint(x[None]).expand(pairs.shape[0], 8).contiguous()
        rebuilt = fingerprint(swapped)
        measured = _per_sample(stored, rebuilt, tol)
        keep = true >= 10 * tol
        assert keep.sum() >= 0.98 * pairs.shape[0]
        missed = keep & ~(measured > tol)
        assert not missed.any(), f"swaps {pairs[missed][:5].tolist()} pass (true {true[missed][:5].tolist()})"
        # Where the float64 fingerprints measure within 20 tol, the stored form measures the same.
        near = _vs_rebuilt_norm(stored, rebuilt) <= MEASURED_EXACTLY * tol
        gap = (measured[near] - _vs_rebuilt_norm(stored[near], rebuilt[near])).abs()
        assert gap.numel() == 0 or gap.max() <= tol / 50


def _fails_every_check(err: torch.Tensor) -> bool:
    """+inf, as documented (not ``finfo.max``, what ``nan_to_num`` makes of +inf by default)."""
    return err.item() == math.inf


@pytest.mark.parametrize("tol", [*TOLS, 1e-9], ids=[*TOL_IDS, "fp64-tol"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_never_passes(tol, value):
    """NaN/Inf in a rebuilt sample fails the check (inf); a non-finite stored fingerprint fails every
    check of its row even against a finite rebuilt one, and leaves the other rows alone."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, dtype=F64, generator=gen)
    fx = fingerprint(x)
    store = FingerprintStore.encode([fx, fx.clone()], [tol, tol])
    bad = x.clone()
    bad[2, 17] = value
    assert _fails_every_check(store.error(0, fingerprint(bad)))

    stored = fx.clone()
    stored[1, 5] = value  # forward's fingerprint of one sample was not finite
    store = FingerprintStore.encode([stored, fx], [tol, tol])
    for rebuilt in (fx, torch.zeros_like(fx), fx * 2):
        assert _fails_every_check(store.error(0, rebuilt))
    assert store.error(1, fx).item() <= tol / 100  # the next row is unaffected


@pytest.mark.parametrize("tol", TOLS, ids=TOL_IDS)
def test_zero_sample_is_no_false_alarm(tol):
    """A stored all-zero sample rebuilt as 1e-12 is measured against the batch's scale (no alarm); an
    all-zero batch rebuilt exactly measures 0 (not NaN); a zero sample rebuilt as O(1) still fails."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 300, dtype=F64, generator=gen)
    x[1] = 0
    noisy = x.clone()
    noisy[1] = 1e-12
    store = FingerprintStore.encode([fingerprint(x)], [tol])
    assert store.error(0, fingerprint(noisy)).item() < tol
    loud = x.clone()
    loud[1] = torch.randn(300, dtype=F64, generator=gen)
    assert store.error(0, fingerprint(loud)).item() > tol

    zeros = torch.zeros(4, 8, dtype=F64)
    assert FingerprintStore.encode([zeros], [tol]).error(0, zeros).item() == 0.0


# -- layout -------------------------------------------------------------------------------------------


def test_seventeen_bytes_per_sample_and_row_and_float64_below_1e_6():
    """Residue rows: int16 codes [rows, B, 8] and uint8 exponent codes [rows, B], 17 bytes per sample and row.
    Below a tolerance of 1e-6 the store keeps float64 values: an exact rebuild measures exactly 0 and
    a drift exactly what relative_error measures; no limit applies."""
    gen = torch.Generator().manual_seed(5)
    rows, batch = 5, 7
    fps = [torch.randn(batch, 8, dtype=F64, generator=gen) for _ in range(rows)]
    for tol in (*TOLS, 1e-6):
        store = FingerprintStore.encode(fps, [tol] * rows)
        tensors = store.take_tensors()
        assert [(t.dtype, tuple(t.shape)) for t in tensors] == [
            (torch.int16, (rows, batch, 8)),
            (torch.uint8, (rows, batch)),
        ]
        assert sum(t.nbytes for t in tensors) == 17 * rows * batch
        assert store.limit(0) == tol

    for tol in (1e-9, 9.99e-7):
        store = FingerprintStore.encode(fps, [tol] * rows)
        assert store.limit(2) == math.inf
        rebuilt = _drifted(fps[2], torch.full((batch, 1), 1e-8, dtype=F64), gen)
        assert store.error(2, fps[2]).item() == 0.0
        assert store.error(2, rebuilt).item() == relative_error(rebuilt, fps[2]).item()
        tensors = store.take_tensors()
        assert [(t.dtype, tuple(t.shape)) for t in tensors] == [(F64, (rows, batch, 8))]
        assert torch.equal(tensors[0], torch.stack(fps))


def test_rows_of_different_tolerances_use_their_own_grid():
    """Rows of one shape and different tolerances share stacked tensors, each on its own grid: a row
    measures exactly what a store of that row alone measures, its exact-rebuild floor stays within its
    own resolution (and the coarsest row's floor above the finest row's resolution: it is not stored on
    the finest grid), and limit(k) is tol_k (inf for float64 rows)."""
    gen = torch.Generator().manual_seed(6)
    tols = [1e-5, 3e-2, 4e-3, 1e-5, 1e-9, 1e-3]
    fps = [torch.randn(64, 8, dtype=F64, generator=gen) * 10.0 ** (k - 2) for k in range(len(tols))]
    store = FingerprintStore.encode(fps, tols)
    floors = []
    for k, (f, tol) in enumerate(zip(fps, tols)):
        alone = FingerprintStore.encode([f], [tol])
        rebuilt = _drifted(f, torch.full((64, 1), 5 * tol, dtype=F64), gen)
        assert store.error(k, f).item() == alone.error(0, f).item()
        assert store.error(k, rebuilt).item() == alone.error(0, rebuilt).item()
        floors.append(store.error(k, f).item())
        if tol >= 1e-6:
            assert floors[-1] <= math.sqrt(8) * 2.0 ** -grid_bits(tol)
            assert store.limit(k) == tol
            assert abs(store.error(k, rebuilt).item() - _vs_rebuilt_norm(f, rebuilt).max().item()) <= tol / 50
        else:
            assert floors[-1] == 0.0 and store.limit(k) == math.inf
    assert floors[1] > math.sqrt(8) * 2.0 ** -grid_bits(1e-5)


def test_take_and_put_tensors_round_trip_in_forward_order():
    """Rows of two batch shapes and both kinds (residues, float64) go to separate groups; the tensors
    take_tensors hands out (as save_for_backward keeps them) rebuild a store whose row k is forward's
    k-th fingerprint: the same errors, bit for bit, and each row measured against its own fingerprint."""
    gen = torch.Generator().manual_seed(7)
    shapes = [4, 6, 4, 6, 4, 6]
    tols = [1e-5, 4e-3, 3e-2, 1e-9, 1e-5, 3e-2]
    fps = [torch.randn(b, 8, dtype=F64, generator=gen) * 10.0**k for k, b in enumerate(shapes)]
    rebuilt = [
        _drifted(f, torch.full((f.shape[0], 1), (k + 1) * t, dtype=F64), gen) for k, (f, t) in enumerate(zip(fps, tols))
    ]
    store = FingerprintStore.encode(fps, tols)
    before = [store.error(k, r).item() for k, r in enumerate(rebuilt)]
    tensors = store.take_tensors()
    # Groups: residues [4, 8] (rows 0, 2, 4), residues [6, 8] (rows 1, 5), float64 [6, 8] (row 3).
    assert sorted((str(t.dtype), tuple(t.shape)) for t in tensors) == sorted(
        [
            ("torch.int16", (3, 4, 8)),
            ("torch.uint8", (3, 4)),
            ("torch.int16", (2, 6, 8)),
            ("torch.uint8", (2, 6)),
            ("torch.float64", (1, 6, 8)),
        ]
    )
    back = store.put_tensors(tuple(t.clone() for t in tensors))
    after = [back.error(k, r).item() for k, r in enumerate(rebuilt)]
    assert after == before
    for k, (f, r, tol) in enumerate(zip(fps, rebuilt, tols)):
        assert abs(after[k] - _vs_rebuilt_norm(f, r).max().item()) <= tol / 50, k
        assert back.limit(k) == (math.inf if tol < 1e-6 else tol)


# -- the engine ---------------------------------------------------------------------------------------


def _mlp(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 16), nn.Tanh(), nn.Linear(16, outputs))


def _blocks(seed: int, drifting: bool = False) -> list[nn.Module]:
    torch.manual_seed(seed)
    blocks: list[nn.Module] = [
        revgrad.AdditiveCoupling(_mlp(4, 4), _mlp(4, 4)),
        revgrad.AffineCoupling(_mlp(4, 8), scale="sigmoid"),
        revgrad.AdditiveCoupling(_mlp(4, 4), _mlp(4, 4)),
        revgrad.AffineCoupling(_mlp(4, 8), scale="exp"),
        revgrad.AdditiveCoupling(_mlp(4, 4), _mlp(4, 4)),
    ]
    if drifting:  # block 3's inverse is off by 1e-3 (100 x tol): its rebuilt input must be corrected
        blocks.insert(3, Scale(8, inverse_error=1e-3))  # not an anchor with anchor_every=2 either
    return blocks


@pytest.mark.parametrize("anchor_every", [None, 2], ids=["default", "anchor_every=2"])
@pytest.mark.parametrize("drifting", [False, True], ids=["healthy", "drifting"])
def test_engine_saves_output_input_and_store_and_gradients_match(anchor_every, drifting):
    """float32, check="correct": forward saves the output, the chain's input (block 0's anchor, the
    tensor itself), the regular anchors only when anchor_every asks for them, and the store (17 bytes per
    sample and fingerprinted block). Gradients equal plain autograd's within 1e-5; a drifting inverse is
    caught by the stored fingerprint (measured 1e-3) and corrected."""
    blocks = _blocks(0, drifting)
    n, batch = len(blocks), 6
    net = revgrad.ReversibleSequential(*copy.deepcopy(blocks), check="correct", anchor_every=anchor_every)
    torch.manual_seed(1)
    x = torch.randn(batch, 8, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    y = out[0] if isinstance(out, tuple) else out
    anchors = sorted(regular_anchors(n, anchor_every)) if anchor_every is not None else [0]
    rows = n - len(anchors)
    assert any(t.data_ptr() == x.data_ptr() for t in saved), "the chain's input is saved as itself"
    assert any(t.data_ptr() == y.data_ptr() for t in saved), "the output is saved"
    activations = [t for t in saved if t.dtype == torch.float32]
    assert len(activations) == 1 + len(anchors)  # the output, x, the anchors above block 0
    assert all(tuple(t.shape) == (batch, 8) for t in activations)
    store = sorted(((t.dtype, tuple(t.shape)) for t in saved if t.dtype != torch.float32), key=str)
    assert store == sorted([(torch.int16, (rows, batch, 8)), (torch.uint8, (rows, batch))], key=str)
    assert sum(t.nbytes for t in saved) == (1 + len(anchors)) * x.nbytes + 17 * batch * rows

    scalar_loss(out).backward()
    report = net.last_report
    measured = [e for i, e in enumerate(report.errors) if i not in report.anchors]
    if drifting:
        assert report.corrected == [3]
        assert abs(report.errors[3] - 1e-3) < 1e-5  # a uniform scaling moves the fingerprint as much
    else:
        assert report.corrected == []
        assert max(measured) < report.tol / 2

    ref_blocks = copy.deepcopy(blocks)
    x_ref = x.detach().clone().requires_grad_(True)
    scalar_loss(plain_chain(ref_blocks, x_ref)).backward()
    assert_rel_close(x.grad, x_ref.grad, 1e-5, "input grad")
    for (name, p), q in zip(net.named_parameters(), (q for b in ref_blocks for q in b.parameters())):
        assert_rel_close(p.grad, q.grad, 1e-5, name)


# -- the documented range, and why a check is never looser than its row's tolerance ---------------------


@pytest.mark.parametrize("tol", TOLS, ids=TOL_IDS)
def test_errors_up_to_twenty_tol_are_measured_exactly_in_any_direction(tol):
    """The module docstring: every error up to ``2^15 2^-P / sqrt(8) >= 20 tol`` is measured exactly.
    Worst case for that bound: all 8 components of f just below a power of 2 (||f|| near sqrt(8) 2^e)
    and the error in one fingerprint direction. A wrapped residue can only lower the measured error,
    so it must not fall below the true one."""
    signs = torch.tensor([1.0, -1, 1, 1, -1, 1, -1, -1], dtype=F64)
    bad = []
    for power in (-20, 0, 33):
        f = (0.999 * 2.0**power * signs)[None]
        for direction in range(8):
            for size in (2, 4, 8, 12, 16, MEASURED_EXACTLY):
                step = torch.zeros(1, 8, dtype=F64)
                step[0, direction] = size * tol * torch.linalg.vector_norm(f)
                rebuilt = f + step
                measured = _per_sample(f, rebuilt, tol)
                true = torch.minimum(_vs_rebuilt_norm(f, rebuilt), _vs_stored_norm(f, rebuilt))
                if measured.item() < true.item() - tol / 50:
                    bad.append((power, direction, size, true.item() / tol, measured.item() / tol))
    assert not bad, f"(2^power, direction, size/tol, true/tol, measured/tol): {bad[:4]} ({len(bad)} cases)"


@pytest.mark.parametrize("tol", TOLS, ids=TOL_IDS)
def test_a_check_at_the_limit_passes_no_large_error(tol):
    """``limit(k)`` is "the loosest tolerance row k can be checked against" (the engine checks at
    ``min(tol_now, limit(k))`` when an activation's tolerance loosened after forward stored it). Such a
    check must still fail errors well above it: random drifts from 1.25 x the limit to 1e6. (A limit
    of 16 tol let 0.4 % to 21 % of them pass: wrapped residues land anywhere in a range ~40 tol wide.)"""
    gen = torch.Generator().manual_seed(8)
    f = _random_fingerprints(40_000, gen)
    limit = FingerprintStore.encode([f], [tol]).limit(0)
    assert limit == tol
    rebuilt = _drifted(f, _log_uniform(40_000, 1.25 * limit, 1e6, gen), gen)
    # Large by either reference (relative to the rebuilt norm, a large drift is smaller).
    true = torch.minimum(_vs_rebuilt_norm(f, rebuilt), _vs_stored_norm(f, rebuilt))
    large = true >= 1.25 * limit
    assert large.sum() >= 10_000
    passed = large & (_per_sample(f, rebuilt, tol) <= limit)
    assert not passed.any(), (
        f"{int(passed.sum())} of {int(large.sum())} errors >= 1.25 x limit pass a check at limit {limit:g} "
        f"(tol {tol:g}); the smallest of them is {true[passed].min().item() / tol:.3g} tol"
    )


def test_errors_of_many_rows_at_once_equal_each_row():
    """Deferred checks settle every block's error in one vectorised comparison (``errors``): it must
    give each row's :meth:`error` exactly, for rows of different grids, float64 rows, rows asked for
    out of order or only some of them, and a non-finite rebuilt sample."""
    torch.manual_seed(3)
    tols = [1e-5, 1e-5, 4e-3, 1e-5, 3e-2, 1e-9, 1e-9, 1e-5]
    fps = [fingerprint(torch.randn(16, 50, dtype=F64 if t < 1e-6 else torch.float32) * 10.0 ** (k - 4))
           for k, t in enumerate(tols)]
    store = FingerprintStore.encode(fps, tols)
    store = store.put_tensors(tuple(store.take_tensors()))
    rebuilt = [f * (1 + 3 * t * torch.randn(16, 1, dtype=F64)) for f, t in zip(fps, tols)]
    rebuilt[3][5, 2] = math.nan
    for rows in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0], [4, 0], [6], [1, 5, 2]):
        each = torch.stack([store.error(k, rebuilt[k]) for k in rows])
        together = store.errors(rows, [rebuilt[k] for k in rows])
        assert together.shape == (len(rows),)
        torch.testing.assert_close(together, each, rtol=1e-12, atol=0, msg=str(rows))
    assert store.errors([3], [rebuilt[3]]).item() == math.inf


def test_wrap_is_the_exact_remainder():
    """``_wrap`` (a floor and two products: a tenth of ``torch.remainder``'s cost on CPU) gives the
    remainder modulo 2^16 exactly, at every magnitude a residue computation meets, and NaN where
    the remainder is NaN."""
    torch.manual_seed(4)
    v = torch.cat([
        torch.randn(4000, dtype=F64) * 10.0 ** torch.randint(-3, 19, (4000,)).double(),
        torch.randint(-2**40, 2**40, (1000,)).double(),
        torch.tensor([0.0, -0.0, 65536.0, -65536.0, 65535.5, -0.5, 2.0**53, -(2.0**60), 1e300, -1e300], dtype=F64),
    ])
    assert torch.equal(_wrap(v), torch.remainder(v, 65536.0))
    special = torch.tensor([math.inf, -math.inf, math.nan], dtype=F64)
    assert _wrap(special).isnan().all() and torch.remainder(special, 65536.0).isnan().all()
