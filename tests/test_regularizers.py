"""The bidirectional finite-difference penalty and its training-loop schedule."""

from __future__ import annotations

import pytest
import torch
from chains import Flip
from reference import assert_rel_close, plain_chain
from torch import nn

import revgrad
from revgrad.analysis.regularizers import PenaltySchedule, finite_difference_penalty

F64 = torch.float64


class LinearMap(nn.Module):
    """``F(x) = x A^T`` on ``[B, n]`` with an invertible ``A``; ``inverse`` solves."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.a, y.T).T


class PlainChain(nn.Module):
    """The same blocks run with plain autograd, forward and inverse."""

    def __init__(self, blocks) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        return plain_chain(self.blocks, x)

    def inverse(self, y):
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y


def affine_blocks(depth: int = 3, channels: int = 4, hidden: int = 8, seed: int = 0, dtype=F64) -> list[nn.Module]:
    torch.manual_seed(seed)
    half = channels // 2
    blocks: list[nn.Module] = []
    for _ in range(depth):
        net = nn.Sequential(nn.Linear(half, hidden), nn.Tanh(), nn.Linear(hidden, 2 * (channels - half)))
        blocks += [revgrad.AffineCoupling(net, scale="sigmoid"), Flip()]
    return [b.to(dtype) for b in blocks]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_rows(shape, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(shape, dtype=F64, generator=g)
    return v / v.norm(dim=1, keepdim=True)


# -- exact values on a linear map -----------------------------------------------------------------


def test_linear_map_terms_are_the_squared_jacobian_vector_norms():
    torch.manual_seed(0)
    n = 5
    a = torch.randn(n, n, dtype=F64) + 3 * torch.eye(n, dtype=F64)
    model = LinearMap(a)
    x = torch.randn(7, n, dtype=F64)
    a_inv = torch.linalg.inv(a)

    v = unit_rows(x.shape, gen(3))
    expected_fwd = (v @ a.T).square().sum(1).mean()
    fwd = finite_difference_penalty(model, x, eps=0.1, direction="forward", generator=gen(3))
    torch.testing.assert_close(fwd, expected_fwd, rtol=1e-10, atol=0)

    v_inv = unit_rows(x.shape, gen(3))
    expected_inv = (v_inv @ a_inv.T).square().sum(1).mean()
    inv = finite_difference_penalty(model, x, eps=0.1, direction="inverse", generator=gen(3))
    torch.testing.assert_close(inv, expected_inv, rtol=1e-10, atol=0)

    # "both": v first, then v' from the same generator; the sum of the two terms.
    g = gen(3)
    v, v_inv = unit_rows(x.shape, g), unit_rows(x.shape, g)
    expected = (v @ a.T).square().sum(1).mean() + (v_inv @ a_inv.T).square().sum(1).mean()
    both = finite_difference_penalty(model, x, eps=0.1, generator=gen(3))
    torch.testing.assert_close(both, expected, rtol=1e-10, atol=0)
    # Independent of eps for a linear map: it estimates ||J v||^2, not ||J v|| / eps.
    small_eps = finite_difference_penalty(model, x, eps=1e-3, generator=gen(3))
    torch.testing.assert_close(small_eps, expected, rtol=1e-8, atol=0)


def test_directions_are_unit_per_sample_over_all_non_batch_dims():
    # F = identity on [B, C, H, W]: each term is mean_b ||v_b||^2 = 1 exactly.
    ident = nn.Identity()
    ident.inverse = lambda y: y  # type: ignore[attr-defined]
    x = torch.randn(4, 2, 3, 3, dtype=F64)
    value = finite_difference_penalty(ident, x, eps=0.5, generator=gen(1))
    torch.testing.assert_close(value, torch.tensor(2.0, dtype=F64), rtol=1e-12, atol=0)


# -- gradients and the engine ---------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "inverse", "both"])
def test_gradient_matches_central_differences_through_the_engine(direction):
    model = revgrad.reversible(nn.Sequential(*affine_blocks()), check="correct")
    torch.manual_seed(1)
    x = torch.randn(6, 4, dtype=F64)

    def penalty() -> torch.Tensor:
        return finite_difference_penalty(model, x, eps=0.1, direction=direction, generator=gen(7))

    params = list(model.parameters())
    grads = torch.autograd.grad(penalty(), params)
    assert all(torch.isfinite(g).all() for g in grads)
    # Directional derivative along a random parameter direction, and a single weight entry.
    torch.manual_seed(2)
    dirs = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs))
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, dirs):
            p.add_(h * d)
        up = penalty()
        for p, d in zip(params, dirs):
            p.sub_(2 * h * d)
        down = penalty()
        for p, d in zip(params, dirs):
            p.add_(h * d)
    numeric = (up - down) / (2 * h)
    assert_rel_close(analytic.reshape(1), numeric.reshape(1), tol=1e-6, name=f"{direction} directional derivative")

    weight = model[0].net[0].weight
    i = params.index(weight)
    with torch.no_grad():
        weight[0, 1] += h
        up = penalty()
        weight[0, 1] -= 2 * h
        down = penalty()
        weight[0, 1] += h
    assert_rel_close(grads[i][0, 1].reshape(1), ((up - down) / (2 * h)).reshape(1), tol=1e-6, name="dP/dW[0,1]")


@pytest.mark.parametrize("check", ["correct", "off"])
def test_engine_value_and_gradients_equal_plain_blocks(check):
    blocks = affine_blocks(seed=3)
    rev = revgrad.reversible(nn.Sequential(*blocks), check=check)
    plain = PlainChain(blocks)  # the same modules: the same parameters
    torch.manual_seed(4)
    x = torch.randn(5, 4, dtype=F64)
    params = list(plain.parameters())

    expected = finite_difference_penalty(plain, x, generator=gen(9))
    expected_grads = torch.autograd.grad(expected, params)
    actual = finite_difference_penalty(rev, x, generator=gen(9))
    actual_grads = torch.autograd.grad(actual, params)

    assert_rel_close(actual.reshape(1), expected.reshape(1), name="penalty")
    for k, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_rel_close(a, e, name=f"grad {k}")
    assert rev.last_report is not None  # the forward terms went through the engine's backward


def test_float32_input_gives_float32_penalty_and_backward_runs():
    model = revgrad.reversible(nn.Sequential(*affine_blocks(dtype=torch.float32)))
    x = torch.randn(3, 4)
    value = finite_difference_penalty(model, x)
    assert value.dtype == torch.float32 and value.dim() == 0
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_global_rng_is_used_only_without_a_generator():
    model = LinearMap(torch.eye(3, dtype=F64) * 2)
    x = torch.randn(4, 3, dtype=F64)
    torch.manual_seed(0)
    finite_difference_penalty(model, x, generator=gen(0))
    after_with_generator = torch.rand(1)
    torch.manual_seed(0)
    finite_difference_penalty(model, x)
    after_global = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after_with_generator, torch.rand(1))
    assert not torch.equal(after_global, after_with_generator)


def test_argument_errors():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="direction"):
        finite_difference_penalty(nn.Identity(), x, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        finite_difference_penalty(nn.Identity(), x, eps=0.0)
    with pytest.raises(TypeError, match="inverse"):
        finite_difference_penalty(nn.Identity(), x)
    finite_difference_penalty(nn.Identity(), x, direction="forward")  # no inverse needed
    with pytest.raises(ValueError, match="every"):
        PenaltySchedule(every=0)
    with pytest.raises(ValueError, match="weight"):
        PenaltySchedule(weight=-1.0)


# -- the schedule ----------------------------------------------------------------------------------


def test_schedule_applies_weighted_penalty_every_nth_step_and_zero_otherwise():
    model = LinearMap(torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=F64)))
    x = torch.randn(4, 3, dtype=F64)
    schedule = PenaltySchedule(every=3, weight=0.5, direction="both", generator=gen(5))
    values = [schedule(step, model, x) for step in range(7)]
    on = [0, 3, 6]
    for step, value in enumerate(values):
        assert value.dim() == 0 and value.dtype == F64
        if step in on:
            assert value.requires_grad and value.item() > 0
        else:
            assert value.item() == 0.0 and not value.requires_grad
    expected = 0.5 * finite_difference_penalty(model, x, generator=gen(5))
    torch.testing.assert_close(values[0], expected)


# -- training --------------------------------------------------------------------------------------


def _train(weight: float, steps: int = 40) -> tuple[float, float]:
    """Adam on ``mean ||y||^2`` (drives sigmoid scales to 0: the inverse explodes) plus the penalty."""
    model = revgrad.reversible(nn.Sequential(*affine_blocks(depth=4, hidden=16, seed=0, dtype=torch.float32)))
    torch.manual_seed(1)
    data = torch.randn(64, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    schedule = PenaltySchedule(every=2, weight=weight, direction="inverse", generator=gen(2))
    for step in range(steps):
        y, _ = model(data)
        loss = y.square().sum(1).mean() + schedule(step, model, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z, _ = model(data)
        v = unit_rows(z.shape, gen(11)).float()
        eps = 0.1
        step_norms = (model.inverse(z + eps * v) - model.inverse(z)).norm(dim=1) / eps
    return step_norms.max().item(), y.square().sum(1).mean().item()


def test_inverse_penalty_keeps_the_inverse_lipschitz_proxy_down_in_training():
    lip_plain, loss_plain = _train(0.0)
    lip_reg, loss_reg = _train(0.05)
    # Without the penalty the scales collapse and the inverse stretches a 0.1-step enormously.
    assert loss_plain < loss_reg
    assert lip_plain > 100.0, lip_plain
    assert lip_reg < lip_plain / 100.0, (lip_reg, lip_plain)
