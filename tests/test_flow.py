"""Glow as a density model (revgrad.models.glow): memory-saving vs plain autograd, round trips, the
log-density against a brute-force change of variables, sampling, conditioning, memory flat in depth."""

from __future__ import annotations

import math

import pytest
import torch
from reference import assert_rel_close

import revgrad
from revgrad.models import Glow, dequantize, glow

TINY = dict(in_channels=1, image_size=8, levels=2, depth=2, hidden=8)
K = 3  # condition_dim of the conditional models


def _condition(batch: int, conditional: bool, dtype=torch.float64, seed: int = 1) -> torch.Tensor | None:
    if not conditional:
        return None
    return torch.randn(batch, K, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _model(seed: int = 0, *, dtype=torch.float64, memory_saving: bool = True, **options) -> Glow:
    """A tiny Glow, ActNorm initialized on data, then every parameter moved off its initial value (the
    zero-initialized last convolutions and priors would make couplings and priors trivial)."""
    torch.manual_seed(seed)
    config = {**TINY, **options}
    model = glow(**config, memory_saving=memory_saving)
    x = torch.rand(4, config["in_channels"], config["image_size"], config["image_size"])
    c = _condition(4, config.get("condition_dim") is not None, torch.float32)
    with torch.no_grad():
        model.log_prob(x, c)  # data-dependent ActNorm init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def _twins(dtype, check: str = "correct", **options) -> tuple[Glow, Glow]:
    fast = _model(dtype=dtype, **options)
    for chain in fast.levels:
        chain.configure(check=check)
    plain = glow(**{**TINY, **options}, memory_saving=False).to(dtype)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _x(batch: int = 3, dtype=torch.float64, seed: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("check", ["off", "correct"])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
@pytest.mark.parametrize("prior", ["standard", "learned"])
@pytest.mark.parametrize("coupling", ["affine", "affine-exp", "additive"])
def test_memory_saving_matches_plain(coupling, prior, conditional, check):
    options = dict(coupling=coupling.split("-")[0], scale="exp" if coupling.endswith("exp") else "sigmoid",
                   prior=prior, condition_dim=K if conditional else None)
    for dtype in (torch.float64, torch.float32):
        fast, plain = _twins(dtype, check, **options)
        assert type(fast.levels[0]) is revgrad.ReversibleSequential
        assert type(plain.levels[0]) is revgrad.PlainSequential
        assert list(fast.state_dict()) == list(plain.state_dict())
        results = []
        for model in (fast, plain):
            x = _x(dtype=dtype).requires_grad_()
            c = _condition(3, conditional, dtype)
            if c is not None:
                c.requires_grad_()
            lp = model.log_prob(x, c)
            bpd = model.bits_per_dim(x, c)
            grads = torch.autograd.grad(bpd, [x, *model.parameters(), *([c] if c is not None else [])])
            results.append((lp.detach(), grads))
        (lp_fast, g_fast), (lp_plain, g_plain) = results
        assert_rel_close(lp_fast, lp_plain, name=f"log_prob {dtype}")
        names = ["x", *(n for n, _ in fast.named_parameters()), "c"]
        for name, a, b in zip(names, g_fast, g_plain):
            assert_rel_close(a, b, name=f"grad {name} {dtype}")


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_decode_inverts_encode(coupling):
    model = _model(coupling=coupling, prior="learned", condition_dim=K)
    x, c = _x(), _condition(3, True)
    latents = model.encode(x, c)
    assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes == [(2, 4, 4), (8, 2, 2)]
    assert_rel_close(model.decode(latents, c), x, tol=1e-10, name="decode(encode(x))")
    with torch.enable_grad():  # the memory-saving inverse under grad gives the same numbers
        latents = [z.detach().requires_grad_() for z in latents]
        back = model.decode(latents, c)
        back.square().sum().backward()
    assert_rel_close(back.detach(), x, tol=1e-10, name="decode under grad")
    assert all(z.grad is not None for z in latents)


def _standardized(model: Glow, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The latents divided by their prior std after subtracting its mean, flattened (the reference's
    own walk over the levels: a map to standard normal noise whose Jacobian the test takes)."""
    args = () if c is None else (c,)
    h, parts = x, []
    for level, chain in enumerate(model.levels):
        h = chain(h, *args)[0]
        if level < len(model.levels) - 1:
            kept, z = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]
            mean, log_std = model.priors[level](kept, c) if model.priors is not None else (0.0, torch.zeros(()))
            h = kept
        else:
            z = h
            mean, log_std = model.priors[level](c) if model.priors is not None else (0.0, torch.zeros(()))
        parts.append(((z - mean) * torch.exp(-log_std)).flatten(1))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("prior,conditional", [("standard", False), ("learned", True)])
def test_log_prob_equals_brute_force_change_of_variables(prior, conditional, coupling):
    model = _model(prior=prior, condition_dim=K if conditional else None, memory_saving=False, coupling=coupling)
    fast = _model(prior=prior, condition_dim=K if conditional else None, coupling=coupling)
    x, c = _x(2), _condition(2, conditional)
    expected = []
    for i in range(2):
        ci = None if c is None else c[i : i + 1]

        def eps(flat, ci=ci):
            return _standardized(model, flat.reshape(1, 1, 8, 8), ci)[0]

        jac = torch.autograd.functional.jacobian(eps, x[i].flatten())
        e = eps(x[i].flatten())
        log_normal = -0.5 * (e.square() + math.log(2 * math.pi)).sum()
        expected.append(log_normal + torch.linalg.slogdet(jac)[1])
    expected = torch.stack(expected)
    assert_rel_close(model.log_prob(x, c).detach(), expected, tol=1e-8, name="plain log_prob")
    assert_rel_close(fast.log_prob(x, c).detach(), expected, tol=1e-8, name="memory-saving log_prob")


def test_bits_per_dim_formula_and_dequantize():
    model = _model()
    x = _x()
    d = 64
    for bins in (256, 32):
        expected = (-model.log_prob(x).mean() + d * math.log(bins)) / (d * math.log(2))
        assert torch.allclose(model.bits_per_dim(x, bins=bins), expected, rtol=1e-12, atol=0)
    ints = torch.tensor([[0, 255], [17, 128]], dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    u = dequantize(ints, generator=g)
    assert torch.equal(torch.get_rng_state(), state)
    assert u.dtype == torch.get_default_dtype() and (u >= 0).all() and (u < 1).all()
    assert torch.equal((u * 256).floor().to(torch.uint8), ints)
    assert torch.equal(u, dequantize(ints, generator=torch.Generator().manual_seed(0)))
    top = dequantize(torch.full((10000,), 255), bins=256)
    assert (top < 1).all()
    with pytest.raises(TypeError, match="integer"):
        dequantize(u)


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_sample_shapes_and_temperature_zero(prior):
    model = _model(prior=prior)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = model.sample(5, generator=g)
        assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float64 and torch.isfinite(x).all()
        again = model.sample(5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(x, again)
        cold = model.sample(2, temperature=0.0)
        if prior == "standard":
            zeros = [torch.zeros(2, *s, dtype=torch.float64) for s in model.latent_shapes]
            assert_rel_close(cold, model.decode(zeros), tol=1e-12, name="temperature 0")
        # at temperature 0 every latent is its prior mean: encoding gives the means back
        latents = model.encode(cold)
        top_mean = 0.0 if model.priors is None else model.priors[-1]()[0]
        assert torch.allclose(latents[-1], torch.zeros_like(latents[-1]) + top_mean, atol=1e-9)
    with torch.enable_grad():  # under grad, sampling goes through the memory-saving inverse
        model.sample(2, generator=g).square().mean().backward()
    assert all(p.grad is not None for p in model.levels.parameters())


def test_sample_leaves_the_callers_rng_untouched():
    model = _model(prior="learned", condition_dim=K)
    state = torch.get_rng_state()
    with torch.no_grad():
        model.sample(3, c=torch.eye(K), generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    model.sample(3, c=torch.eye(K), generator=torch.Generator().manual_seed(0)).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_conditional_model(prior):
    model = _model(prior=prior, condition_dim=K)
    x = _x(K)
    one_hot = torch.eye(K, dtype=torch.float64)
    lp = model.log_prob(x, one_hot).detach()
    lp_other = model.log_prob(x, one_hot.roll(1, dims=0)).detach()
    assert (lp - lp_other).abs().min() > 1e-6, "log_prob does not depend on the condition"
    with torch.no_grad():
        samples = model.sample(K, c=one_hot, generator=torch.Generator().manual_seed(0))
        same_noise = model.sample(K, c=one_hot[[0, 0, 0]], generator=torch.Generator().manual_seed(0))
    assert samples.shape == (K, 1, 8, 8)
    for k in range(1, K):
        # the same noise in row k, decoded for class k and for class 0
        assert (samples[k] - same_noise[k]).abs().max() > 1e-4, f"class {k} samples as class 0"
    with pytest.raises(ValueError, match="conditional"):
        model.log_prob(x)
    with pytest.raises(ValueError, match="condition c of shape"):
        model.log_prob(x, torch.zeros(K, K + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="not conditional"):
        _model().log_prob(x, one_hot)


def test_bad_configurations():
    with pytest.raises(ValueError, match="divisible"):
        glow(1, 12, levels=3)
    with pytest.raises(ValueError, match="coupling"):
        glow(1, 8, levels=2, coupling="spline")
    with pytest.raises(ValueError, match="prior"):
        glow(1, 8, levels=2, prior="mixture")
    with pytest.raises(ValueError, match="expects x"):
        _model().log_prob(torch.rand(2, 3, 8, 8, dtype=torch.float64))


def test_memory_held_grows_far_less_in_depth_than_plain():
    from revgrad import MemoryProbe

    def held(depth: int, memory_saving: bool) -> int:
        torch.manual_seed(0)
        model = glow(3, 16, levels=2, depth=depth, hidden=16, memory_saving=memory_saving, check="off")
        x = torch.rand(8, 3, 16, 16)
        for _ in range(2):  # the second forward is measured (ActNorm init and first-call caches done)
            model.zero_grad(set_to_none=True)
            with MemoryProbe() as probe:
                loss = model.bits_per_dim(x)
                nbytes = probe.mark("held")
            loss.backward()
            del loss
        return nbytes

    activation = 8 * 3 * 16 * 16 * 4  # one input-sized float32 tensor
    plain = held(8, False) - held(2, False)
    saving = held(8, True) - held(2, True)
    assert plain > 20 * activation, f"plain autograd grew only {plain / activation:.1f} activations"
    # measured: plain grows ~90 activations from depth 2 to 8 per level, memory saving ~3.4 (3.8 %)
    assert saving < 0.1 * plain, (
        f"memory saving grew {saving / activation:.2f} activations, plain autograd {plain / activation:.1f}"
    )
