"""Activation memory held between forward and backward: RevNet-38/110/164, plain vs revgrad.

    python bench/models_memory.py [--batch 16] [--check correct]

CPU bytes counted by glibc (revgrad.tools.memory.MemoryProbe), CUDA bytes from the allocator when run on a
GPU (``--device cuda``). Same weights for both variants (the state dicts are interchangeable).
"""

from __future__ import annotations

import argparse
import gc

import torch

from revgrad import models
from revgrad.tools.memory import MemoryProbe


def held_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.train()
    model(x).sum().backward()  # warm-up: lazily created state is not activation memory
    model.zero_grad(set_to_none=True)
    gc.collect()
    with MemoryProbe(x.device) as probe:
        out = model(x)
        held = probe.mark("held")
        out.sum().backward()
        del out
    model.zero_grad(set_to_none=True)
    return held / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--check", default="correct", choices=["off", "detect", "correct"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    print(f"torch {torch.__version__}, device {args.device}, batch {args.batch}, input 3x32x32, check={args.check!r}\n")
    print("| model | parameters | plain autograd MiB | revgrad MiB | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in ("revnet38", "revnet110", "revnet164"):
        build = getattr(models, name)
        plain = build(num_classes=10, memory_saving=False).to(args.device)
        saving = build(num_classes=10, memory_saving=True, check=args.check).to(args.device)
        saving.load_state_dict(plain.state_dict())
        params = sum(p.numel() for p in plain.parameters())
        a, b = held_mib(plain, x), held_mib(saving, x)
        print(f"| {name} | {params / 1e6:.2f}M | {a:.1f} | {b:.1f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
