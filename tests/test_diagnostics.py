"""revgrad.analysis.diagnostics: stability_report and ood_probes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from chains import assert_unstable, conv_branch, exploding_chain
from torch import nn

import revgrad
from revgrad.analysis.diagnostics import StabilityReport, lipschitz_bound, ood_probes, stability_report


def _x(shape=(2, 4, 4, 4), seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _additive_chain(depth: int = 3, seed: int = 0) -> revgrad.ReversibleSequential:
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [revgrad.AdditiveCoupling(conv_branch(2), conv_branch(2)), revgrad.Reverse()]
    return revgrad.ReversibleSequential(*blocks)


def _mixed_chain(seed: int = 0) -> revgrad.ReversibleSequential:
    """Additive couplings and Glow affine couplings with saturated sigmoid scales (~1/1100) and large shifts.

    ``y2 = (x2 + 1000) s``: float32 rounding of ``y2`` comes back as ~1000 eps in ``x2 = y2 / s - 1000``
    (affine blocks ~3e-5, additive ones ~5e-8: a gap of ~900x where the test needs 30x; a shift of
    100 left ~60x, too close to call on every machine).
    """
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    for _ in range(3):
        conv = nn.Conv2d(2, 4, 3, padding=1)
        with torch.no_grad():
            conv.bias[:2] = 1000.0
            conv.bias[2:] = -9.0
        blocks += [
            revgrad.AdditiveCoupling(conv_branch(2), conv_branch(2)),
            revgrad.AffineCoupling(conv, scale="sigmoid"),
            revgrad.Reverse(),
        ]
    return revgrad.ReversibleSequential(*blocks)


def test_exploding_chain_inverse_far_less_stable_than_forward():
    chain = exploding_chain(12)
    # Premise: even from its exact output, some block's input is rebuilt >= 100x the float32 tolerance off.
    assert_unstable(chain, _x(), revgrad.default_tol(torch.float32))
    model = revgrad.reversible(chain)
    rep = stability_report(model, _x(), iterations=3)
    assert len(rep.blocks) == len(model)
    assert rep.total.lip_inverse > 1e3 * rep.total.lip_forward
    for row, block in zip(rep.blocks, model):
        if isinstance(block, revgrad.AffineCoupling):
            assert row.lip_inverse > 1e4  # 1 / sigmoid(-12) ~ 1.6e5
            assert row.bound_forward is None and row.bound_inverse is None
        else:  # the flips are exact
            assert row.recon_error == 0.0
            assert row.lip_inverse == pytest.approx(1.0, rel=1e-4)
    affine = [r.recon_error for r, b in zip(rep.blocks, model) if isinstance(b, revgrad.AffineCoupling)]
    assert min(affine) > 0.0
    # the 12-block chain's reconstruction is far off (here: not even finite)
    assert rep.total.recon_error > 1e-3

    # a shallower chain stays finite, and the gap between inverse and forward is still plain
    shallow = exploding_chain(4)
    assert_unstable(shallow, _x(), revgrad.default_tol(torch.float32))  # premise: ~1e-2 per block
    short = stability_report(revgrad.reversible(shallow), _x(), iterations=3).total
    assert math.isfinite(short.lip_inverse) and short.lip_inverse > 1e3 * short.lip_forward
    assert 1e-3 < short.recon_error < 1.0  # measured 3e-2: compounded over 4 couplings, still finite


def test_glow_layers_bounds_hold():
    torch.manual_seed(0)
    model = revgrad.ReversibleSequential(
        revgrad.ActNorm(4),
        revgrad.InvertibleConv1x1(4, lu=True),
        revgrad.Shuffle(4),
        revgrad.Squeeze(2),
        revgrad.InvertibleConv1x1(16),
    )
    x = _x() * 3.0 + 1.0
    model.train()
    model(x)  # ActNorm's data-dependent init
    rep = stability_report(model, x, iterations=20)
    for row in [*rep.blocks, rep.total]:
        assert row.bound_forward is not None and row.bound_inverse is not None
        assert row.bound_forward >= row.lip_forward * (1 - 1e-4)
        assert row.bound_inverse >= row.lip_inverse * (1 - 1e-4)
        assert row.recon_error < 1e-5
    assert model.training


def test_mixed_chain_flags_the_affine_blocks():
    model = _mixed_chain()
    rep = stability_report(model, _x(), iterations=3)
    kinds = [type(b) for b in model]
    affine = [r for r, k in zip(rep.blocks, kinds) if k is revgrad.AffineCoupling]
    additive = [r for r, k in zip(rep.blocks, kinds) if k is revgrad.AdditiveCoupling]
    flips = [r for r, k in zip(rep.blocks, kinds) if k is revgrad.Reverse]
    assert min(r.recon_error for r in affine) > 30 * max(r.recon_error for r in additive)
    assert all(r.recon_error == 0.0 for r in flips)
    assert min(r.lip_inverse for r in affine) > 100 * max(r.lip_inverse for r in additive)
    for r in additive:
        assert r.bound_forward is not None and r.bound_forward >= r.lip_forward


def test_additive_chain_is_stable_and_bounds_hold():
    model = _additive_chain()
    rep = stability_report(model, _x(), iterations=5)
    for row in [*rep.blocks, rep.total]:
        assert row.recon_error < 1e-5
        assert row.recon_error_mean <= row.recon_error
        assert row.nonfinite == 0.0
        assert 0.5 < row.lip_forward < 10 and 0.5 < row.lip_inverse < 10
        assert row.bound_forward is not None and row.bound_inverse is not None
        assert row.bound_forward >= row.lip_forward * (1 - 1e-6)
        assert row.bound_inverse >= row.lip_inverse * (1 - 1e-6)


def test_local_estimate_matches_exact_singular_value():
    torch.manual_seed(0)
    layer = revgrad.InvertibleConv1x1(4)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([3.0, 1.0, 1.0, 0.5]).view(4, 1))
    fwd, inv = layer.lipschitz_bounds()
    rep = stability_report(layer, _x((3, 4)), iterations=30)
    assert rep.blocks[0].lip_forward == pytest.approx(fwd, rel=1e-3)
    assert rep.blocks[0].lip_inverse == pytest.approx(inv, rel=1e-3)
    assert rep.total.bound_forward == pytest.approx(fwd)


def test_conv_and_batchnorm_bounds_are_upper_bounds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, stride=2), nn.BatchNorm2d(5), nn.Tanh(), nn.Conv2d(5, 3, 1))
    net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    bound = lipschitz_bound(net)
    x = torch.randn(1, 3, 6, 6)
    jac = torch.autograd.functional.jacobian(lambda t: net(t).flatten(), x).reshape(-1, x.numel())
    assert bound >= float(torch.linalg.matrix_norm(jac, ord=2))
    assert lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.GELU())) is None
    assert lipschitz_bound(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")) is None


def test_to_dict_and_str():
    model = _additive_chain(depth=1)
    rep = stability_report(model, _x(), iterations=2)
    assert isinstance(rep, StabilityReport)
    d = rep.to_dict()
    json.dumps(d)  # plain Python data
    assert len(d["blocks"]) == 2 and d["total"]["name"] == "total"
    assert set(d["total"]) >= {
        "recon_error",
        "recon_error_mean",
        "nonfinite",
        "lip_forward",
        "lip_inverse",
        "bound_forward",
        "bound_inverse",
    }
    text = str(rep)
    assert "AdditiveCoupling" in text and "Reverse" in text and "total" in text
    assert len(text.splitlines()) == 2 + 2 + 2  # header, rule, 2 blocks, rule, total


def test_affine_bounds_none_and_nonfinite_share():
    torch.manual_seed(0)
    for scale in ("sigmoid", "exp", "bounded"):
        block = revgrad.AffineCoupling(nn.Conv2d(2, 4, 1), scale=scale)
        rep = stability_report(block, _x(), iterations=2)
        assert rep.blocks[0].bound_forward is None and rep.blocks[0].bound_inverse is None
        assert rep.blocks[0].nonfinite == 0.0

    class NaNInverse(nn.Module):
        def forward(self, x):
            return x

        def inverse(self, y):
            y = y.clone()
            y.view(-1)[:4] = float("nan")
            return y

    rep = stability_report(NaNInverse(), _x((2, 4)), iterations=2)
    assert rep.total.nonfinite == pytest.approx(0.5)
    assert math.isinf(rep.total.recon_error)

    class Stretch(nn.Module):  # Jacobian of the inverse 1e30: finite in float32, its square is not
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x / self.factor

        def inverse(self, y):
            return y * self.factor

    rep = stability_report(Stretch(1e30), _x((2, 4)), iterations=3)
    assert rep.total.lip_inverse == pytest.approx(1e30, rel=1e-5)
    assert rep.total.lip_forward == pytest.approx(1e-30, rel=1e-5)
    assert math.isinf(stability_report(Stretch(math.inf), _x((2, 4)), iterations=2).total.lip_inverse)


def test_training_flags_restored_and_global_rng_untouched():
    model = _additive_chain(depth=2)
    model.train()
    model[0].f[1].eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    running = model[0].f[1].running_mean.clone()
    state = torch.get_rng_state()
    stability_report(model, _x(), iterations=2)
    assert [m.training for m in model.modules()] == before
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model[0].f[1].running_mean, running)


def test_rejects_non_blocks():
    with pytest.raises(TypeError):
        stability_report(nn.Linear(2, 2), _x((2, 2)))
    with pytest.raises(TypeError):
        stability_report(revgrad.ReversibleSequential(revgrad.Reverse(), nn.ReLU()), _x((2, 2)))


def test_ood_probes():
    x = _x((3, 4, 5, 5)) * 3.0
    state = torch.get_rng_state()
    probes = ood_probes(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(probes) == {"gaussian", "rademacher", "scaled_2x", "scaled_10x"}
    for p in probes.values():
        assert p.shape == x.shape and p.dtype == x.dtype
    again = ood_probes(x)
    for k in probes:
        assert torch.equal(probes[k], again[k])
    assert not torch.equal(ood_probes(x, seed=1)["gaussian"], probes["gaussian"])
    std = float(x.std())
    assert float(probes["gaussian"].std()) == pytest.approx(std, rel=0.2)
    assert torch.allclose(probes["rademacher"].abs(), torch.full_like(x, std))
    assert torch.equal(probes["scaled_2x"], x * 2)
    assert torch.equal(probes["scaled_10x"], x * 10)
    assert ood_probes(x.double())["gaussian"].dtype == torch.float64
