"""Gradients under CPU bf16 autocast: plain autograd's own noise vs revgrad's check modes.

    python bench/low_precision.py

For each chain, every provider runs forward and backward under ``torch.autocast("cpu", bfloat16)``;
errors are relative L2 distances of the full gradient (input and parameters) to the float32 gradient
of plain autograd without autocast ("truth") and to plain autograd under the same autocast.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from chains import exploding_chain, healthy_chain
from reference import flat_grads_bf16, rel_error


def main() -> None:
    cases = {
        "healthy, 24 couplings": (healthy_chain(24, channels=6, seed=0), 6),
        "healthy, 48 couplings": (healthy_chain(48, channels=6, seed=1), 6),
        "exploding, 12 affine couplings": (exploding_chain(12, bias=-6.0), 4),
    }
    print(f"torch {torch.__version__}\n")
    print("| chain | plain bf16 vs truth | check | revgrad vs truth | revgrad vs plain bf16 |")
    print("|---|---|---|---|---|")
    for name, (net, channels) in cases.items():
        torch.manual_seed(0)
        x = torch.randn(4, channels, 6, 6)
        truth = flat_grads_bf16(net, x, autocast=False, check=None)[0]
        plain = flat_grads_bf16(net, x, autocast=True, check=None)[0]
        noise = rel_error(plain, truth)
        for check in ("off", "correct"):
            got = flat_grads_bf16(net, x, autocast=True, check=check)[0]
            print(f"| {name} | {noise:.3g} | {check} | {rel_error(got, truth):.3g} | {rel_error(got, plain):.3g} |")


if __name__ == "__main__":
    main()
