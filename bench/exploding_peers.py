"""Exploding inverses: who returns the right gradient? (the README's worked example)

    python bench/exploding_peers.py [--depth 12] [--bias -6]

A Glow-style chain of affine couplings whose sigmoid scales saturate near zero (the exploding-inverse
regime of Behrmann et al. 2021), with a channel flip between couplings. Every provider starts from the
same weights and input; the table gives the relative L2 error of its input and parameter gradients
against plain autograd (which stores every activation and is exact up to float32 rounding).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from chains import exploding_chain
from reference import plain_chain, rel_error, scalar_loss

import revgrad


class _DropLogdet(nn.Module):
    """memcnn's wrapper takes blocks returning one tensor: hide the logdet (not used by the loss)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out

    def inverse(self, y):
        return self.block.inverse(y)


def _grads(model: nn.Module, x: torch.Tensor, run) -> torch.Tensor:
    xx = x.clone().requires_grad_()
    out = run(model, xx)
    y = out[0] if isinstance(out, tuple) else out
    scalar_loss(y).backward()
    return torch.cat([xx.grad.flatten(), *(p.grad.flatten() for p in model.parameters())])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--bias", type=float, default=-8.0, help="raw-scale bias: sigmoid(bias + 2) is the scale")
    args = parser.parse_args(argv)

    net = exploding_chain(args.depth, bias=args.bias)
    torch.manual_seed(0)
    x = torch.randn(4, 4, 6, 6)
    truth = _grads(copy.deepcopy(net), x, lambda m, h: plain_chain(m, h))
    rows = []

    try:
        import memcnn

        wrapped = nn.Sequential(*[
            memcnn.InvertibleModuleWrapper(_DropLogdet(b), keep_input=False, keep_input_inverse=False)
            for b in copy.deepcopy(net)
        ])
        got = _grads(wrapped, x, lambda m, h: m(h.clone()))  # memcnn frees its input's storage
        rows.append(("memcnn InvertibleModuleWrapper", rel_error(got, truth), "no check"))
    except ImportError:
        rows.append(("memcnn InvertibleModuleWrapper", float("nan"), "not installed"))

    reports = {}
    for check in ("off", "correct"):
        model = revgrad.reversible(copy.deepcopy(net), check=check)
        got = _grads(model, x, lambda m, h: m(h))
        reports[check] = model.last_report
        rows.append((f'revgrad check="{check}"', rel_error(got, truth), str(model.last_report.corrected or "-")))
    detect = revgrad.reversible(copy.deepcopy(net), check="detect")
    try:
        _grads(detect, x, lambda m, h: m(h))
        detect_result = "no error"
    except revgrad.ReconstructionError as err:
        detect_result = str(err)

    print(f"{args.depth} affine couplings (sigmoid scale ~ {torch.sigmoid(torch.tensor(args.bias + 2)).item():.4f}),"
          f" torch {torch.__version__}\n")
    print("| provider | gradient error vs plain autograd | blocks corrected |")
    print("|---|---|---|")
    for name, err, note in rows:
        print(f"| {name} | {err:.3g} | {note} |")
    print(f'\ncheck="correct" report: {reports["correct"]}')
    print(f'check="detect": {detect_result}')


if __name__ == "__main__":
    main()
