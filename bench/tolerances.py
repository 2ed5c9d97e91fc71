"""Measure what the default tolerances rest on: fingerprint noise floor and healthy-chain errors.

    python bench/tolerances.py

Prints a markdown table; the numbers in docs/architecture.md ("Tolerances") come from this script.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from chains import healthy_chain
from reference import scalar_loss

import revgrad
from revgrad.engine.checks import relative_error
from revgrad.ops.fingerprint import fingerprint, signs


def noise_floor(dtype: torch.dtype) -> float:
    worst = 0.0
    for dim in (7, 1000, 65536, 300000):
        for scale in (1e-3, 1.0, 1e3):
            torch.manual_seed(dim)
            x = torch.randn(16, dim, dtype=torch.float64) * scale
            x[:, : dim // 3] += 5 * scale
            x = x.to(dtype)
            exact = x.to(torch.float64) @ signs(dim)
            worst = max(worst, relative_error(fingerprint(x), exact).item())
    return worst


def healthy_error(depth: int, dtype: torch.dtype, autocast: bool, seeds: int = 4) -> float:
    worst = 0.0
    for seed in range(seeds):
        net = healthy_chain(depth, channels=6, seed=seed).to(dtype)
        torch.manual_seed(100 + seed)
        x = torch.randn(4, 6, 6, 6, dtype=dtype, requires_grad=True)
        # Measure everything, correct nothing (tol must be finite). Stored fingerprints resolve errors
        # to tol / 200 (revgrad.engine.checks); keep float64 ones here so the errors are the true ones.
        model = revgrad.reversible(net, tol=1e300)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        scalar_loss(out).backward()
        worst = max(worst, model.last_report.max_error)
    return worst


def main() -> None:
    revgrad.engine.checks._EXACT_BELOW = math.inf  # float64 fingerprints: a measurement, not a check
    print(f"torch {torch.__version__}\n")
    print("| compute dtype | default tol | fingerprint noise floor | healthy 24-block | healthy 48-block "
          "| healthy 64-block |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("float64", torch.float64, torch.float64, False),
        ("float32", torch.float32, torch.float32, False),
        ("bfloat16 (autocast)", torch.bfloat16, torch.float32, True),
    ]
    for name, compute, storage, autocast in rows:
        print(
            f"| {name} | {revgrad.default_tol(compute):.0e} | {noise_floor(compute):.2g} "
            f"| {healthy_error(24, storage, autocast):.2g} | {healthy_error(48, storage, autocast):.2g} "
            f"| {healthy_error(64, storage, autocast):.2g} |"
        )


if __name__ == "__main__":
    main()
