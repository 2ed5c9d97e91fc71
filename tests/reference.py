"""What every gradient test compares against: plain autograd, one relative-error helper, one table.

Tolerances are relative L2 errors ``||actual - expected|| / ||expected||`` per dtype:

| dtype    | tol   | why                                                                  |
|----------|-------|----------------------------------------------------------------------|
| float64  | 1e-10 | rounding only; gradcheck-tight                                       |
| float32  | 1e-5  | reversible gradients within 1e-5 of plain autograd's (the promise)   |
| bfloat16 | 3e-2  | a few bf16 ulps (eps 7.8e-3) after accumulation over the chain      |
| float16  | 5e-3  | a few fp16 ulps (eps 9.8e-4)                                         |
"""

from __future__ import annotations

import copy

import torch
from torch import nn

TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 distance, computed in float64 (0 when both are zero)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = torch.linalg.vector_norm(e).item()
    num = torch.linalg.vector_norm(a - e).item()
    if denom == 0.0:
        return num
    return num / denom


def assert_rel_close(actual, expected, tol: float | None = None, name: str = "tensor") -> None:
    """Assert ``rel_error(actual, expected) <= tol`` (default: TOL of ``expected``'s dtype)."""
    assert actual is not None, f"{name}: got None, expected a tensor"
    assert expected is not None, f"{name}: reference is None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOL[expected.dtype] if tol is None else tol
    err = rel_error(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def plain_chain(blocks, x: torch.Tensor, *args, **kwargs):
    """Run blocks with plain autograd: ``y`` or ``(y, logdet)``, as a ReversibleSequential would
    (extra arguments go to every block)."""
    logdet = None
    h = x
    for block in blocks:
        out = block(h, *args, **kwargs)
        if isinstance(out, tuple):
            h, ld = out
            logdet = ld if logdet is None else logdet + ld
        else:
            h = out
    return h if logdet is None else (h, logdet)


def scalar_loss(out) -> torch.Tensor:
    """A loss that weighs every output element differently (so wrong permutations show)."""
    y, logdet = (out, None) if isinstance(out, torch.Tensor) else out
    w = torch.linspace(-1.0, 2.0, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.device, y.dtype)
    loss = (y * w).sum() + 0.5 * y.square().sum()
    if logdet is not None:
        loss = loss + (logdet * torch.arange(1, logdet.numel() + 1, dtype=logdet.dtype, device=logdet.device)).sum()
    return loss


def grads_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def flat_grads_bf16(net: nn.Module, x: torch.Tensor, *, autocast: bool, check: str | None):
    """All gradients (input, then parameters) of one step of a deep copy of ``net``, flattened.

    ``check=None`` runs plain autograd, otherwise ``revgrad.reversible(..., check=check)``; under CPU
    bf16 autocast when ``autocast``. Returns ``(gradients, the module that ran)``.
    """
    import revgrad

    model = copy.deepcopy(net)
    run = (lambda h: plain_chain(model, h)) if check is None else revgrad.reversible(model, check=check)
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = run(xx)
    scalar_loss(out).backward()
    return torch.cat([xx.grad.flatten(), *(p.grad.flatten() for p in model.parameters())]), run


def named_grads(model: nn.Module, x: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """Parameter gradients by name, plus the input's under ``"input"``."""
    grads = {n: p.grad for n, p in model.named_parameters()}
    if x is not None:
        grads["input"] = x.grad
    return grads
