"""Reversible transformer stacks under autocast: plain autograd's own error vs revgrad's check modes.

    python bench/transformer_precision.py                       # CPU: bf16 and fp16 autocast, ~5 min
    python bench/transformer_precision.py --device cuda         # the same on a GPU
    python bench/transformer_precision.py --depths 12 --scales 1 --dtypes bf16    # one quick row

The stack is ``depth`` layers ``revgrad.AdditiveCoupling(SelfAttention, MLP, dim=-1)`` (the layers of
:func:`revgrad.models.rev_lm`: pre-LN causal attention and a pre-LN MLP, each stream ``--dim`` features)
on tokens ``x: [B, T, 2 * dim]``. A *branch scale* ``k`` multiplies every ``F`` and ``G`` output by ``k``
(the same weights for every ``k``): larger branches make each inverse (``x2 = y2 - G(y1)``,
``x1 = y1 - F(x2)``) subtract larger numbers, so a rounding of a branch's output is a larger error of
the rebuilt input, and errors compound down the stack.

Every provider runs one step from the same weights and input, forward under
``torch.autocast(device, dtype)``; the loss (float32: the residual streams stay float32 under
autocast, the branches compute in the low precision) is ``(sum(w * y) + sum(y^2) / 2) / numel(y)``
with a fixed ``w``. The table gives the relative L2 error of the whole gradient (the input's and every
parameter's) against the float32 reference (plain autograd, same weights, no autocast), for

- plain autograd under autocast (the low precision's own error: the floor),
- revgrad ``check="off"`` (classic reversible backprop) and ``check="correct"`` (the default),

and, for ``check="correct"``, its distance to plain autograd under the same autocast, the blocks it
corrected and the largest rebuild error its checks measured (``model.last_report``).

float16 runs with a ``torch.amp.GradScaler`` as in training: starting at its default scale 2^16, a
step whose gradients are not finite is run again at the scale the scaler lowered it to (attempts and
the final scale are listed below the table). Each provider is a fresh copy of the stack, so its first
backward is also a sensitivity probe (``report.probed``); an overflowing first attempt leaves the probe
its non-finite measurements until the next probe, which the corrections of the later attempt show.
On CPU, float16 autocast runs (torch >= 2.3) through float32 kernels for some ops; it is slower than
bf16 but its rounding is float16's.
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import revgrad
from revgrad.models.transformer import MLP, SelfAttention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_ATTEMPTS = 16  # GradScaler halvings before a float16 step is declared non-finite


class Scaled(nn.Module):
    """``module``'s output times ``factor`` (a branch scale); extra arguments pass through."""

    def __init__(self, module: nn.Module, factor: float) -> None:
        super().__init__()
        self.module = module
        self.factor = factor

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.module(x, *args, **kwargs) * self.factor


def stack(depth: int, dim: int, heads: int, factor: float, seed: int) -> nn.Sequential:
    """``depth`` couplings of causal attention and MLP branches scaled by ``factor``; weights from ``seed``
    (the same for every ``factor``)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[
        revgrad.AdditiveCoupling(Scaled(SelfAttention(dim, heads, causal=True), factor),
                                 Scaled(MLP(dim, 4 * dim), factor), dim=-1)
        for _ in range(depth)
    ])


def loss_of(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = y.float()
    return ((y * w).sum() + 0.5 * y.square().sum()) / y.numel()


@dataclass
class Run:
    grads: torch.Tensor  # input, then parameters, flattened, float32
    report: revgrad.BackwardReport | None
    attempts: int
    scale: float | None  # the GradScaler's scale of the step that counted (float16)
    finite: bool
    inf_sensitivities: int  # activations whose probed sensitivity is not finite (tolerance 0 until the next probe)


def run_step(net: nn.Sequential, x: torch.Tensor, w: torch.Tensor, check: str | None,
             dtype: torch.dtype | None, device: str, init_scale: float = 2.0**16) -> Run:
    """One step of a fresh copy of ``net``: plain autograd (``check=None``) or revgrad; under autocast
    to ``dtype`` unless ``None``; float16 with a GradScaler (from ``init_scale``), repeated while the
    gradients overflow."""
    model = copy.deepcopy(net)
    if check is not None:
        revgrad.reversible(model, check=check)
    params = list(model.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=init_scale, enabled=dtype == torch.float16)
    optimizer = torch.optim.SGD(params, lr=0.0)  # only for the scaler's bookkeeping: nothing is stepped
    attempts = 0
    while True:
        attempts += 1
        optimizer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(xx)
        scaler.scale(loss_of(out, w)).backward()
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        grads = torch.cat([xx.grad.flatten() / scale, *(p.grad.flatten() for p in params)]).float()
        finite = bool(torch.isfinite(grads).all())
        if scaler.is_enabled():
            scaler.update()
        if finite or not scaler.is_enabled() or attempts == MAX_ATTEMPTS:
            break
    report = model.last_report if check is not None else None
    probes = getattr(model, "_sensitivity", {})  # the engine's per-run probe state (private: a measurement)
    inf = sum(not math.isfinite(v) for state in probes.values() for v in state.values.values())
    return Run(grads, report, attempts, scale if scaler.is_enabled() else None, finite, inf)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else ("NaN" if math.isnan(value) else "Inf")


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} with uncommitted changes" if dirty else head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0, 8.0],
                        help="branch scales: every F and G output times this (default: 1 4 8)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--dim", type=int, default=64, help="features per stream (default: 64)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32, help="tokens T (default: 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device).type
    start = time.perf_counter()
    print(f"torch {torch.__version__}, commit {commit()}, device {args.device}, x [{args.batch}, {args.seq}, "
          f"{2 * args.dim}] (two streams of {args.dim}), {args.heads} heads, seed {args.seed}\n")
    print("| autocast | depth | branch scale | plain vs fp32 | off vs fp32 | correct vs fp32 "
          "| correct vs plain | corrected blocks | max rebuild error (tol) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    notes: list[str] = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for depth in args.depths:
            for factor in args.scales:
                net = stack(depth, args.dim, args.heads, factor, args.seed).to(args.device)
                gen = torch.Generator().manual_seed(args.seed + 1)
                x = torch.randn(args.batch, args.seq, 2 * args.dim, generator=gen).to(args.device)
                w = torch.randn(x.shape, generator=gen).to(args.device)
                truth = run_step(net, x, w, None, None, device).grads
                runs = {check: run_step(net, x, w, check, dtype, device) for check in (None, "off", "correct")}
                plain, off, correct = runs[None], runs["off"], runs["correct"]
                report = correct.report
                corrected = "-" if report is None else (str(report.corrected) if report.corrected else "none")
                error = "-" if report is None else f"{report.max_error:.2g} ({report.tol:g})"
                print(f"| {name} | {depth} | x{factor:g} | {fmt(rel(plain.grads, truth))} | "
                      f"{fmt(rel(off.grads, truth))} | {fmt(rel(correct.grads, truth))} | "
                      f"{fmt(rel(correct.grads, plain.grads))} | {corrected} | {error} |", flush=True)
                if dtype == torch.float16:
                    note = (
                        f"- fp16, depth {depth}, x{factor:g}: GradScaler attempts (final scale) "
                        + ", ".join(f"{label} {r.attempts} ({r.scale:g}{'' if r.finite else ', not finite'})"
                                    for label, r in (("plain", plain), ("off", off), ("correct", correct)))
                    )
                    if correct.attempts > 1 and correct.finite:
                        # The first attempt probed with overflowing gradients; the same step started at
                        # the scale that worked probes cleanly.
                        clean = run_step(net, x, w, "correct", dtype, device, init_scale=correct.scale)
                        note += (
                            f"; correct's probe (attempt 1, overflowed) left {correct.inf_sensitivities} "
                            f"non-finite sensitivities, so the counted attempt corrected "
                            f"{len(report.corrected)} block(s); started at scale {correct.scale:g} (clean probe) "
                            f"it corrects {clean.report.corrected or 'none'}, error vs fp32 "
                            f"{fmt(rel(clean.grads, truth))}, vs plain {fmt(rel(clean.grads, plain.grads))}"
                        )
                    notes.append(note)
    if notes:
        print("\n" + "\n".join(notes))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
