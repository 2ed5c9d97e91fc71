"""End-to-end training step of a Glow stage with the coupling kernels on and off.

    python bench/glow_step.py --out results/               # CUDA when present, else CPU

Model: ``revgrad.glow_classifier`` (one level: squeeze, then ``depth`` x [ActNorm, LU 1x1 conv,
sigmoid affine coupling]), loss = cross-entropy - mean logdet / pixels. Providers, timed in
interleaved rounds (``revgrad.tools.measure.time_interleaved``: median step, paired ratio to plain per round):

* ``plain``: plain autograd;
* ``revgrad-kernels``: ``check="correct"`` with ``REVGRAD_KERNELS=auto`` (the kernels on CUDA; on
  the CPU with ``TRITON_INTERPRET=1``, a dry run, ``triton``: the kernels through the interpreter);
* ``revgrad-torch``: ``check="correct"`` with ``REVGRAD_KERNELS=torch`` (the PyTorch twins);
* ``revgrad-off-kernels``: ``check="off"`` with the kernels.

Before timing, every provider's gradients are compared with plain autograd's (relative L2 error of
all gradients, reported). Peak memory of the step: ``torch.cuda.max_memory_allocated`` above the
model and batch, or allocator bytes on CPU. glow_step.json / glow_step.md are written once the
gradients and peaks are known and again with the times, so a run cut short keeps the first part.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import revgrad
from revgrad.models import glow_classifier
from revgrad.ops import dispatch
from revgrad.tools.measure import time_interleaved
from revgrad.tools.memory import MemoryProbe

PROVIDERS = {
    "plain": (False, "correct", "torch"),
    "revgrad-kernels": (True, "correct", "auto"),
    "revgrad-torch": (True, "correct", "torch"),
    "revgrad-off-kernels": (True, "off", "auto"),
}


def build(args, device: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = glow_classifier(in_channels=3, levels=1, depth=args.depth, hidden=args.hidden,
                                   permutation="lu", memory_saving=False)
    for net in base.modules():  # start away from the identity so the scales vary
        if isinstance(net, torch.nn.Conv2d) and not net.weight.abs().sum():
            torch.nn.init.normal_(net.weight, std=1e-3)
    base = base.to(device)
    models = {}
    for name, (saving, check, _) in PROVIDERS.items():
        m = copy.deepcopy(base)
        models[name] = revgrad.reversible(m, check=check) if saving else m
    return models


def kernel_mode(mode: str) -> str:
    """``auto`` runs the twins on CPU tensors; with the interpreter on and no GPU (a dry run), the
    kernel providers run the kernels through it instead."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
    return "triton" if mode == "auto" and interpreting else mode


def step(model, x, labels, mode: str) -> None:
    with dispatch.overridden(kernel_mode(mode)):
        logits = model(x)
        nll = -model.last_logdet.mean() / x[0].numel()
        (F.cross_entropy(logits, labels) + nll).backward()


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side (default 64 on CUDA, 16 on CPU)")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per provider per round")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args.batch = args.batch or (64 if cuda else 8)
    args.size = args.size or (64 if cuda else 16)
    args.hidden = args.hidden or (128 if cuda else 16)
    models = build(args, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Agreement with plain autograd, and ActNorm initialization on the same batch for everyone.
    ref = None
    errors = {}
    for name, model in models.items():
        step(model, x, labels, PROVIDERS[name][2])
        g = grads(model)
        ref = g if ref is None else ref
        errors[name] = float((g - ref).norm() / ref.norm())
        model.zero_grad(set_to_none=True)

    peak = {}
    for name, model in models.items():
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(model, x, labels, PROVIDERS[name][2])
            sync()
            peak[name] = torch.cuda.max_memory_allocated() - base
        else:
            with MemoryProbe("cpu", track_peak=True) as probe:
                step(model, x, labels, PROVIDERS[name][2])
            peak[name] = probe.peak
        model.zero_grad(set_to_none=True)

    class Step:  # the protocol of revgrad.tools.measure.time_interleaved
        def __init__(self, name: str) -> None:
            self.name = name

        def prepare(self) -> None:
            models[self.name].zero_grad(set_to_none=True)

        def run(self) -> None:
            step(models[self.name], x, labels, PROVIDERS[self.name][2])

    import triton

    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "triton": triton.__version__, "argv": sys.argv, "batch": args.batch, "size": args.size,
        "depth": args.depth, "hidden": args.hidden, "rounds": args.rounds, "steps": args.steps,
        "kernels": kernel_mode("auto"),
    }

    def save(med: dict[str, float] | None, ratio: dict[str, float] | None, times: dict | None) -> str:
        rows = [
            {"provider": name, "step_ms": med[name] if med else None, "x_plain": ratio[name] if ratio else None,
             "peak_mib": peak[name] / 2**20, "grad_rel_error": errors[name]}
            for name in models
        ]
        lines = [
            f"Glow stage ({args.depth} x [ActNorm, LU 1x1 conv, sigmoid affine coupling], hidden {args.hidden}), "
            f"batch [{args.batch}, 3, {args.size}, {args.size}] on {info['device']}; torch {info['torch']}, "
            f"triton {info['triton']}" + ("" if med else " (no step times yet)"),
            "",
            "| provider | step ms (median) | × plain | peak MiB | grad rel. error vs plain |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['provider']} | {_num(r['step_ms'])} | {_num(r['x_plain'])} | {r['peak_mib']:.1f} | "
                  f"{r['grad_rel_error']:.1e} |" for r in rows]
        table = "\n".join(lines) + "\n"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "glow_step.json").write_text(json.dumps({"info": info, "rows": rows, "times": times}, indent=2))
        (args.out / "glow_step.md").write_text(table)
        return table

    save(None, None, None)
    timings = time_interleaved({name: Step(name) for name in models}, rounds=args.rounds, per_round=args.steps,
                               device=device)
    table = save({name: timings.median_ms(name) for name in models}, {name: timings.ratio(name) for name in models},
                 timings.times)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
