"""Scaled additive couplings (MEFT's ``y1 = lambda * x1 + f(x2)``): gradient error against plain autograd.

The inverse divides by ``lambda``, so each block amplifies the rounding of a rebuilt input by about
``1 / lambda``; over a chain, unchecked reversible backprop (``check="off"``) compounds it. For each
``lambda``, a chain of ``--depth`` couplings on token-shaped input ``[B, T, 2 * width]`` (split along the
last dimension, MLP sub-networks) runs one step in float32 with plain autograd, ``check="off"`` and
``check="correct"``; the table gives each one's relative L2 error over the input and parameter
gradients against plain float32 autograd, and plain float32's against float64 (the rounding floor).

    python bench/scaled_coupling.py            # lambda 1, 0.5, 0.1, 0.05; 12 couplings
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import revgrad


def chain(scale1: float, depth: int, width: int, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(width, 4 * width), nn.Tanh(), nn.Linear(4 * width, width))

    return [revgrad.AdditiveCoupling(mlp(), mlp(), dim=-1, scale1=scale1) for _ in range(depth)]


def gradients(blocks: list[nn.Module], x: torch.Tensor, check: str | None) -> torch.Tensor:
    bs = copy.deepcopy(blocks)
    run = nn.Sequential(*bs) if check is None else revgrad.reversible(bs, check=check)
    xx = x.clone().requires_grad_()
    run(xx).square().mean().backward()
    return torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in nn.ModuleList(bs).parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.1, 0.05])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {args.depth} couplings, x [4, 6, {2 * args.width}] float32, seed {args.seed}")
    print("| lambda | plain fp32 vs fp64 | off vs plain | correct vs plain | corrections |")
    print("|---:|---:|---:|---:|---:|")
    for scale in args.scales:
        blocks = chain(scale, args.depth, args.width, args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(4, 6, 2 * args.width, generator=gen)
        truth = gradients([b.double() for b in copy.deepcopy(blocks)], x.double(), None)
        plain = gradients(blocks, x, None)
        off = gradients(blocks, x, "off")
        model = revgrad.reversible(copy.deepcopy(blocks))
        xx = x.clone().requires_grad_()
        model(xx).square().mean().backward()
        correct = torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])
        print(f"| {scale:g} | {rel(plain, truth):.2g} | {rel(off, plain):.2g} | {rel(correct, plain):.2g} | "
              f"{len(model.last_report.corrected)} |")


if __name__ == "__main__":
    main()
