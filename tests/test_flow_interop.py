"""Flows through revgrad, checked against the flow libraries themselves: normflows' flows as blocks
(``NormflowsBlock``/``normflows_blocks``), ``chain.inverse(y, with_logdet=True)``, and
``revgrad.reversible`` refusing a whole normflows model. Float64, values and gradients to 1e-10."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import revgrad

TOL = 1e-10
CHECKS = ["off", "correct"]


def _nf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("normflows")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def _grads(params, x):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params] + [x.grad.clone()]


def _nf_model(nf, dim: int = 4, depth: int = 3, conditional: bool = False):
    """A RealNVP-style normflows model (couplings, permutations, ActNorm, LU linear), float64."""
    torch.manual_seed(0)
    flows = []
    for i in range(depth):
        if conditional:
            flows.append(nf.flows.MaskedAffineAutoregressive(dim, 8, context_features=3, num_blocks=1))
        else:
            flows.append(nf.flows.AffineCouplingBlock(nf.nets.MLP([dim // 2, 8, dim], init_zeros=False)))
        flows.append(nf.flows.Permute(dim, mode="swap" if i % 2 else "shuffle"))
        flows.append(nf.flows.LULinearPermute(dim, identity_init=False))
        if not conditional:
            flows.append(nf.flows.ActNorm(dim))
    q0 = nf.distributions.DiagGaussian(dim, trainable=True)
    cls = nf.ConditionalNormalizingFlow if conditional else nf.NormalizingFlow
    model = cls(q0=q0, flows=flows).double()
    with torch.no_grad():  # ActNorm's data-dependent initialisation, and parameters away from identity
        model.log_prob(torch.randn(16, dim, dtype=torch.float64), **({"context": torch.randn(16, 3).double()}
                                                                     if conditional else {}))
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _generative(model, z):
    """normflows' ``forward_and_log_det``, summed in z's dtype (normflows starts from a float32 zero)."""
    log_det = z.new_zeros(z.shape[0])
    for flow in model.flows:
        z, d = flow(z)
        log_det = log_det + d
    return z, log_det


def _normalizing(model, x):
    """normflows' ``inverse_and_log_det``, summed in x's dtype."""
    log_det = x.new_zeros(x.shape[0])
    for flow in reversed(model.flows):
        x, d = flow.inverse(x)
        log_det = log_det + d
    return x, log_det


# -- task 1: normflows' flows as blocks -----------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
def test_normflows_log_prob_and_gradients_equal_normflows(check):
    nf = _nf()
    model = _nf_model(nf)
    ref = copy.deepcopy(model)
    chain = revgrad.reversible(revgrad.normflows_blocks(model), check=check)
    assert [b.flow for b in chain] == list(model.flows)[::-1]  # same modules, normalizing order
    x = torch.randn(32, 4, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    z, logdet = chain(x)
    log_p = model.q0.log_prob(z) + logdet
    log_p_ref = ref.log_prob(x_ref)
    _close(log_p, log_p_ref)
    assert z.grad_fn is not None and "RevBackprop" in type(z.grad_fn).__name__  # through the engine

    (-log_p.mean()).backward()
    ref.forward_kld(x_ref).backward()
    for got, want in zip(_grads(list(model.parameters()), x), _grads(list(ref.parameters()), x_ref)):
        _close(got, want)


@pytest.mark.parametrize("check", CHECKS)
def test_normflows_sampling_with_logdet_equals_normflows(check):
    nf = _nf()
    model = _nf_model(nf)
    ref = copy.deepcopy(model)
    chain = revgrad.reversible(revgrad.normflows_blocks(model), check=check)
    z = torch.randn(32, 4, dtype=torch.float64, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_()

    x, ld = chain.inverse(z, with_logdet=True)
    x_ref, ld_ref = _generative(ref, z_ref)  # normflows' generative pass: x and log|det dx/dz|
    _close(x, x_ref)
    _close(ld, ld_ref)
    _close(chain.inverse(z.detach()), x_ref)  # default: x only

    loss = lambda x, ld: (x.square().sum(1) * torch.linspace(0.5, 2, 4, dtype=x.dtype)[None, :1]).sum() - ld.sum()  # noqa: E731
    loss(x, ld).backward()
    loss(x_ref, ld_ref).backward()
    for got, want in zip(_grads(list(model.parameters()), z), _grads(list(ref.parameters()), z_ref)):
        _close(got, want)


def test_normflows_generative_direction():
    nf = _nf()
    model = _nf_model(nf)
    chain = revgrad.reversible(revgrad.normflows_blocks(model, direction="generative"))
    assert [b.flow for b in chain] == list(model.flows)
    z = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    x, ld = chain(z)
    x_ref, ld_ref = _generative(model, z)
    _close(x, x_ref)
    _close(ld, ld_ref)
    back, ld_back = chain.inverse(x.detach(), with_logdet=True)
    z_ref, ld_back_ref = _normalizing(model, x.detach())
    _close(back, z_ref)
    _close(ld_back, ld_back_ref)


@pytest.mark.parametrize("check", CHECKS)
def test_conditional_normflows_log_prob_and_gradients(check):
    nf = _nf()
    model = _nf_model(nf, conditional=True)
    ref = copy.deepcopy(model)
    chain = revgrad.reversible(revgrad.normflows_blocks(model), check=check)
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    x_ref, c_ref = (t.detach().clone().requires_grad_() for t in (x, c))

    z, logdet = chain(x, context=c)  # Permute/LULinearPermute take z only: the context is left out for them
    log_p = model.q0.log_prob(z) + logdet
    log_p_ref = ref.log_prob(x_ref, context=c_ref)
    _close(log_p, log_p_ref)
    (-log_p.mean()).backward()
    ref.forward_kld(x_ref, context=c_ref).backward()
    for got, want in zip([*_grads(list(model.parameters()), x), c.grad],
                         [*_grads(list(ref.parameters()), x_ref), c_ref.grad]):
        _close(got, want)


def test_normflows_block_errors():
    nf = _nf()
    with pytest.raises(ValueError, match="direction"):
        revgrad.NormflowsBlock(nf.flows.Permute(4), direction="forward")
    with pytest.raises(TypeError, match="normflows flow"):
        revgrad.NormflowsBlock(nn.Linear(2, 2))
    multi = nn.Module()
    multi.flows = nn.ModuleList([nn.ModuleList([nf.flows.Permute(4)])])
    with pytest.raises(TypeError, match="MultiscaleFlow"):
        revgrad.normflows_blocks(multi)
    block = revgrad.NormflowsBlock(nf.flows.Permute(4, mode="swap")).double()
    _y, ld = block(torch.randn(3, 4, dtype=torch.float64))
    assert ld.shape == (3,)  # normflows' scalar 0 broadcast


# -- task 3: a whole normflows model ----------------------------------------------------------------


def test_reversible_refuses_a_whole_normflows_model():
    nf = _nf()
    model = _nf_model(nf)
    with pytest.raises(TypeError, match="normflows_blocks"):
        revgrad.reversible(model)
    assert type(model.flows) is nn.ModuleList  # left as it was

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = model

    with pytest.raises(TypeError, match=r"'flow'.*normflows_blocks"):
        revgrad.reversible(Holder())


# -- task 2: inverse with logdet, revgrad's own blocks and FrEIA ---------------------------------------


def fc(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out))


def _own_blocks():
    torch.manual_seed(1)
    blocks = [
        revgrad.AffineCoupling(fc(2, 4)),
        revgrad.ActNorm(4),
        revgrad.InvertibleConv1x1(4),
        revgrad.AdditiveCoupling(fc(2, 2), fc(2, 2)),
        revgrad.Shuffle(4),
        revgrad.AffineCoupling(fc(2, 4), scale="exp"),
    ]
    model = revgrad.PlainSequential(*blocks).double()
    with torch.no_grad():
        model(torch.randn(16, 4, dtype=torch.float64))  # ActNorm's initialisation
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return list(model)


def _reference_inverse(blocks, y):
    """Plain autograd, independently of the engine: x = f^-1(y), logdet = -(forward logdet at x)."""
    x = y
    for b in reversed(blocks):
        x = b.inverse(x)
        x = x[0] if isinstance(x, tuple) else x
    h, fwd = x, 0.0
    for b in blocks:
        out = b(h)
        h, fwd = (out[0], fwd + out[1]) if isinstance(out, tuple) else (out, fwd)
    return x, -fwd


@pytest.mark.parametrize("check", ["off", "detect", "correct"])
def test_inverse_with_logdet_own_blocks_equals_plain_autograd(check):
    blocks = _own_blocks()
    ref_blocks = copy.deepcopy(blocks)
    chain = revgrad.reversible(blocks, check=check)
    y = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    y_ref = y.detach().clone().requires_grad_()

    x, ld = chain.inverse(y, with_logdet=True)
    x_ref, ld_ref = _reference_inverse(ref_blocks, y_ref)
    _close(x, x_ref)
    _close(ld, ld_ref)
    assert "RevBackprop" in type(x.grad_fn).__name__
    plain = revgrad.PlainSequential(*copy.deepcopy(blocks))
    _close(plain.inverse(y.detach(), with_logdet=True)[1], ld_ref.detach())
    # round trip: the forward logdet at x is minus the inverse one
    _close(chain(x.detach())[1], -ld.detach())

    w = torch.linspace(-1, 1, 4, dtype=torch.float64)
    ((x * w).sum() + (ld * ld).sum()).backward()
    ((x_ref * w).sum() + (ld_ref * ld_ref).sum()).backward()
    params = [p for b in blocks for p in b.parameters()]
    ref_params = [p for b in ref_blocks for p in b.parameters()]
    for got, want in zip(_grads(params, y), _grads(ref_params, y_ref)):
        _close(got, want)


def test_inverse_default_unchanged_and_volume_preserving_zeros():
    torch.manual_seed(2)
    chain = revgrad.reversible([revgrad.AdditiveCoupling(fc(2, 2), fc(2, 2)), revgrad.Reverse()]).double()
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x = chain.inverse(y)
    assert isinstance(x, torch.Tensor)
    x2, ld = chain.inverse(y, with_logdet=True)
    _close(x2, x)
    assert ld.shape == (5,) and not ld.any()
    with torch.no_grad():
        x3, _ld3 = chain.inverse(y, with_logdet=True)
    _close(x3, x)


def test_inverse_with_logdet_freia_equals_freia():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = pytest.importorskip("FrEIA.modules")
        ff = pytest.importorskip("FrEIA.framework")
    torch.manual_seed(3)
    inn = ff.SequenceINN(4)
    for _ in range(3):
        inn.append(fm.GLOWCouplingBlock, subnet_constructor=fc)
        inn.append(fm.PermuteRandom)
    inn = inn.double()
    ref = copy.deepcopy(inn)
    chain = revgrad.reversible(revgrad.freia_blocks(inn))
    z = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_()
    x, ld = chain.inverse(z, with_logdet=True)
    x_ref, ld_ref = ref(z_ref, rev=True)
    _close(x, x_ref)
    _close(ld, ld_ref)
    (x.square().sum() + ld.sum()).backward()
    (x_ref.square().sum() + ld_ref.sum()).backward()
    for got, want in zip(_grads(list(inn.parameters()), z), _grads(list(ref.parameters()), z_ref)):
        _close(got, want)
