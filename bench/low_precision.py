"""Gradients under CPU bf16 autocast: plain autograd's own noise vs revgrad's check modes.

    python bench/low_precision.py

For each chain, every provider runs forward and backward under ``torch.autocast("cpu", bfloat16)``;
errors are relative L2 distances of the full gradient (input and parameters) to the float32 gradient
of plain autograd without autocast ("truth") and to plain autograd under the same autocast.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from chains import exploding_chain, healthy_chain
from reference import plain_chain, rel_error, scalar_loss

import revgrad


def gradients(net, x, *, autocast: bool, check: str | None):
    model = copy.deepcopy(net)
    run = (lambda h: plain_chain(model, h)) if check is None else revgrad.reversible(model, check=check)
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = run(xx)
    scalar_loss(out).backward()
    return torch.cat([xx.grad.flatten(), *(p.grad.flatten() for p in model.parameters())])


def main() -> None:
    cases = {
        "healthy, 24 couplings": (healthy_chain(24, channels=6, seed=0), 6),
        "healthy, 48 couplings": (healthy_chain(48, channels=6, seed=1), 6),
        "exploding, 12 affine couplings": (exploding_chain(12), 4),
    }
    print(f"torch {torch.__version__}\n")
    print("| chain | plain bf16 vs truth | check | revgrad vs truth | revgrad vs plain bf16 |")
    print("|---|---|---|---|---|")
    for name, (net, channels) in cases.items():
        torch.manual_seed(0)
        x = torch.randn(4, channels, 6, 6)
        truth = gradients(net, x, autocast=False, check=None)
        plain = gradients(net, x, autocast=True, check=None)
        noise = rel_error(plain, truth)
        for check in ("off", "correct"):
            got = gradients(net, x, autocast=True, check=check)
            print(f"| {name} | {noise:.3g} | {check} | {rel_error(got, truth):.3g} | {rel_error(got, plain):.3g} |")


if __name__ == "__main__":
    main()
