"""A FrEIA INN with FrEIA's defaults, memory-saving: how far classic reversible backprop's gradient is off.

16 ``GLOWCouplingBlock``s (``clamp=2``, the default), subnets ``Linear -> ReLU -> Linear`` at PyTorch's
default initialisation, no ActNorm, on scikit-learn's 8x8 digits (64 features, scaled to [0, 1]).
Each row runs one maximum-likelihood step (``0.5 |z|^2 - log|det J|``, mean over the batch) through
``revgrad.reversible(revgrad.freia_blocks(inn))`` and compares the input and parameter gradients with
FrEIA's own (plain autograd on the same module objects): relative L2 error.

    python bench/paper/freia_defaults.py            # seconds
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

import revgrad


def build(blocks: int, hidden: int, seed: int) -> nn.Module:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))

    torch.manual_seed(seed)
    inn = Ff.SequenceINN(64)
    for _ in range(blocks):
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=2.0)
    return inn


def digits(batch: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    data = torch.tensor(load_digits().data[:batch], dtype=torch.float32) / 16.0
    return data


def nll(z: torch.Tensor, log_jac: torch.Tensor) -> torch.Tensor:
    return (0.5 * z.square().sum(1) - log_jac).mean()


def gradients(inn: nn.Module, x: torch.Tensor, check: str | None) -> tuple[torch.Tensor, int]:
    model = copy.deepcopy(inn)
    xx = x.clone().requires_grad_()
    corrected = 0
    if check is None:
        z, log_jac = model(xx)
    else:
        chain = revgrad.reversible(revgrad.freia_blocks(model), check=check)
        z, log_jac = chain(xx)
    nll(z, log_jac).backward()
    if check is not None and chain.last_report is not None:
        corrected = len(chain.last_report.corrected)
    grads = [xx.grad.flatten()] + [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads), corrected


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    x = digits(args.batch)
    print(f"torch {torch.__version__}; {args.blocks} GLOWCouplingBlocks (clamp 2), hidden {args.hidden}, "
          f"batch {args.batch} digits, float32")
    print("| seed | FrEIA float32 vs float64 | `off` vs FrEIA | `correct` vs FrEIA | blocks corrected |")
    print("|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        inn = build(args.blocks, args.hidden, seed)
        plain, _ = gradients(inn, x, None)
        truth, _ = gradients(copy.deepcopy(inn).double(), x.double(), None)
        off, _ = gradients(inn, x, "off")
        correct, corrected = gradients(inn, x, "correct")
        print(f"| {seed} | {rel(plain, truth):.2g} | {rel(off, plain):.2g} | {rel(correct, plain):.2g} | {corrected} |")


if __name__ == "__main__":
    main()
