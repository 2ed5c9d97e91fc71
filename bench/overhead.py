"""Where a reversible step's time goes on CPU: the recompute bound and the framework's own overhead.

    python bench/overhead.py                         # 12-block RevNet stage, one thread
    python bench/overhead.py --parts ratios --rounds 12 --json bench/out/overhead.json
    python bench/overhead.py --parts small-blocks small-memory --rounds 12

Timed measurements interleave every provider round by round (``revgrad.tools.measure``):

1. **Recompute bound** at the stage's real size: plain autograd's forward without grad, as a fraction
   of plain autograd's training step. Any method that evaluates every block once more in backward
   (revgrad, RevLib, memcnn's inverse, checkpointing) pays at least that extra evaluation, so its
   step time is at least ``1 + fraction`` times plain's unless it keeps some blocks' graphs
   (``graph_budget``).
2. **Framework overhead**: the same stage with tiny tensors (batch 2, 4 channels, 2x2), where the
   arithmetic is negligible and a step's time is the cost of dispatching ops, of Python and of the
   engine's bookkeeping. Reported: median and first quartile of the step (the quartile is steadier
   on a shared VM), and each provider's excess over plain autograd at the first quartile.
3. **Ratios** at the real size: each provider's step time over plain autograd's, paired per round
   (the comparison to run on two commits, alternately, to measure a change).
4. **Small blocks** (``small-blocks``, ``small-memory``): the Glow classifier's flow, 26 blocks of 64
   values per sample: step time against a hand-written memory-saving loop, and the bytes each
   provider holds between forward and backward at batch 64 and 256.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn

import revgrad
from revgrad.tools.benchmark import TrainStep, revnet_stage, unavailable
from revgrad.tools.measure import machine_info, pin_malloc, time_interleaved

PROVIDERS = ("plain", "revlib", "memcnn", "revgrad-off", "revgrad-correct")
TINY = {"batch": 2, "channels": 4, "size": 2}


class ForwardOnly:
    """Plain autograd's forward under ``no_grad``: the one extra evaluation a recompute costs."""

    def __init__(self, step: TrainStep) -> None:
        self.step = step

    def prepare(self) -> None:
        self.step.prepare()

    def run(self) -> None:
        with torch.no_grad():
            self.step.stage.module(self.step.h)


def recompute_bound(rounds: int, blocks: int) -> dict[str, float]:
    workload = revnet_stage(blocks=blocks)
    plain = TrainStep(workload.build("plain"), workload.input())
    forward = ForwardOnly(TrainStep(workload.build("plain"), workload.input()))
    steps = {"plain step": plain, "plain forward (no grad)": forward}
    timings = time_interleaved(steps, rounds=rounds, per_round=2, warmup=1)
    return {
        "plain_step_ms": timings.median_ms("plain step"),
        "forward_ms": timings.median_ms("plain forward (no grad)"),
        "forward_fraction": timings.ratio("plain forward (no grad)", "plain step") or float("nan"),
    }


def overhead(rounds: int, blocks: int) -> list[dict[str, Any]]:
    workload = revnet_stage(blocks=blocks, **TINY)
    steps = {
        p: TrainStep(workload.build(p), workload.input())
        for p in PROVIDERS
        if unavailable(p, workload) is None
    }
    timings = time_interleaved(steps, rounds=rounds, per_round=10, warmup=3)
    base = timings.quantile_ms("plain", 0.25)
    return [
        {
            "provider": p,
            "median_ms": timings.median_ms(p),
            "q25_ms": timings.quantile_ms(p, 0.25),
            "excess_over_plain_ms": timings.quantile_ms(p, 0.25) - base,
        }
        for p in steps
    ]


def ratios(rounds: int, blocks: int) -> list[dict[str, Any]]:
    workload = revnet_stage(blocks=blocks)
    steps = {
        p: TrainStep(workload.build(p), workload.input())
        for p in PROVIDERS
        if unavailable(p, workload) is None
    }
    timings = time_interleaved(steps, rounds=rounds, per_round=2, warmup=1)
    return [{"provider": p, "median_ms": timings.median_ms(p), "x_plain": timings.ratio(p)} for p in steps]


# -- small blocks: the engine's bookkeeping against a hand-written memory-saving loop -----------------


class _HandWritten(torch.autograd.Function):
    """The memory-saving loop one writes by hand (as the exploding-inverses authors did): forward
    without grad keeping only the output; backward, per block from the top, ``inverse`` without grad,
    then the block again with ``torch.enable_grad`` and ``torch.autograd.grad``. No checks, no RNG or
    buffer replay, no fused couplings: the floor of what reversible backprop costs in Python."""

    @staticmethod
    def forward(ctx, blocks, x, *params):  # type: ignore[override]
        h, logdet = x, None
        for block in blocks:
            out = block(h)
            h, ld = out if isinstance(out, tuple) else (out, None)
            if ld is not None:
                logdet = ld if logdet is None else logdet + ld
        ctx.blocks, ctx.params = blocks, params
        ctx.save_for_backward(h)
        return h, logdet

    @staticmethod
    def backward(ctx, gy, gld):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        grads: dict[int, torch.Tensor] = {}
        for block in reversed(ctx.blocks):
            with torch.no_grad():
                x = block.inverse(y)
                x = x[0] if isinstance(x, tuple) else x
            params = [p for p in block.parameters() if p.requires_grad]
            with torch.enable_grad():
                x_ = x.detach().requires_grad_()
                out = block(x_)
                y_, ld = out if isinstance(out, tuple) else (out, None)
                outs, gouts = [y_], [gy]
                if ld is not None and gld is not None:
                    outs.append(ld)
                    gouts.append(gld)
                found = torch.autograd.grad(outs, [x_, *params], gouts, allow_unused=True)
            for p, g in zip(params, found[1:]):
                if g is not None:
                    grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g
            y, gy = x, found[0]
        return (None, gy, *(grads.get(id(p)) for p in ctx.params))


class HandWrittenChain(nn.Module):
    """Blocks trained with :class:`_HandWritten`: ``forward(x) -> (y, logdet)``."""

    def __init__(self, blocks) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        return _HandWritten.apply(list(self.blocks), x, *[p for p in self.blocks.parameters() if p.requires_grad])


def small_blocks(rounds: int) -> list[dict[str, Any]]:
    """Step time of the Glow classifier's flow (26 blocks, 64 values per sample, batch 64) per provider."""
    from revgrad.models import glow_classifier

    torch.manual_seed(0)
    model = glow_classifier(in_channels=1, levels=2, depth=4, hidden=16, permutation="conv", memory_saving=False)
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        model(x)  # ActNorm's initialisation
    blocks = list(model.flow)
    flows = {
        "plain": model.flow,
        "hand-written loop": HandWrittenChain(blocks),
        "revgrad-off": revgrad.ReversibleSequential(*blocks, check="off"),
        "revgrad-correct": revgrad.ReversibleSequential(*blocks, check="correct"),
        "revgrad-correct (no probes)": revgrad.ReversibleSequential(*blocks, check="correct", probe_every=0),
        # ceil(sqrt(26)) = 6: the regular anchors a correction would lay, stored in forward instead.
        "revgrad-correct (anchors in forward)": revgrad.ReversibleSequential(*blocks, check="correct", anchor_every=6),
    }

    class Step:
        def __init__(self, flow) -> None:
            self.flow = flow
            self.gen = torch.Generator().manual_seed(1)

        def prepare(self) -> None:
            self.h = torch.randn(64, 1, 8, 8, generator=self.gen)

        def run(self) -> None:
            plain = model.flow
            model.flow = self.flow
            try:
                model.zero_grad(set_to_none=True)
                z = self.flow(self.h)[0] if isinstance(self.flow, HandWrittenChain) else model.latent(self.h)
                model.fc(z.mean((2, 3))).square().mean().backward()
            finally:
                model.flow = plain

    steps = {name: Step(flow) for name, flow in flows.items()}
    timings = time_interleaved(steps, rounds=rounds, per_round=10, warmup=3)
    return [{"provider": p, "median_ms": timings.median_ms(p), "x_plain": timings.ratio(p),
             "x_off": timings.ratio(p, "revgrad-off")} for p in steps]


def small_memory(batches: tuple[int, ...] = (64, 256)) -> list[dict[str, Any]]:
    """Bytes held between forward and backward by the Glow classifier's flow (26 blocks of 64 values per
    sample), in activations (one block input: batch x 64 float32), per provider and batch size.

    Counted by glibc (:class:`revgrad.tools.memory.MemoryProbe`): tensors and the Python objects of
    the graph alike. ``check="correct"`` with ``anchor_every=6`` stores its regular anchors in forward
    (ceil(sqrt(26)) = 6), as the default does lazily.
    """
    from revgrad.models import glow_classifier
    from revgrad.tools.memory import MemoryProbe, cpu_counting_available

    if not cpu_counting_available():
        return []
    torch.manual_seed(0)
    model = glow_classifier(in_channels=1, levels=2, depth=4, hidden=16, permutation="conv", memory_saving=False)
    with torch.no_grad():
        model(torch.randn(64, 1, 8, 8))  # ActNorm's initialisation
    blocks = list(model.flow)
    flows = {
        "plain": revgrad.PlainSequential(*blocks),
        "hand-written loop": HandWrittenChain(blocks),
        "revgrad-off": revgrad.ReversibleSequential(*blocks, check="off"),
        "revgrad-detect": revgrad.ReversibleSequential(*blocks, check="detect"),
        "revgrad-correct": revgrad.ReversibleSequential(*blocks, check="correct"),
        "revgrad-correct (anchors in forward)": revgrad.ReversibleSequential(*blocks, check="correct", anchor_every=6),
    }
    rows = []
    for name, flow in flows.items():
        row: dict[str, Any] = {"provider": name}
        for batch in batches:
            activation = batch * 64 * 4
            held = []
            for _ in range(3):  # the first step creates lazily made state (weights tables, caches)
                x = torch.randn(batch, 1, 8, 8)
                with MemoryProbe(torch.device("cpu")) as probe:
                    z, logdet = flow(x)
                    held.append(probe.mark("held"))
                    (z.square().mean() + logdet.mean()).backward()
                    del z, logdet
            row[f"held_b{batch}"] = min(held[1:]) / activation
        rows.append(row)
    for row in rows:
        for batch in batches:
            row[f"x_off_b{batch}"] = row[f"held_b{batch}"] / rows[2][f"held_b{batch}"]
    return rows


PARTS = ("bound", "overhead", "ratios", "small-blocks", "small-memory")


def _table(columns: list[str], rows: list[tuple[str, ...]]) -> None:
    print("| provider | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pinned = pin_malloc()
    payload: dict[str, Any] = {}
    if "bound" in args.parts:
        bound = payload["bound"] = recompute_bound(args.rounds, args.blocks)
        print(f"recompute bound, {args.blocks}-block stage: plain step {bound['plain_step_ms']:.1f} ms, forward "
              f"without grad {bound['forward_ms']:.1f} ms = {bound['forward_fraction']:.3f} of a step -> a "
              f"recompute-once method takes >= {1 + bound['forward_fraction']:.2f}x plain\n")
    if "overhead" in args.parts:
        rows = payload["overhead"] = overhead(args.rounds, args.blocks)
        print(f"framework overhead, {args.blocks} blocks on {tuple(revnet_stage(**TINY).sample_shape)} x batch 2:\n")
        _table(["median step ms", "first quartile ms", "excess over plain ms"],
               [(r["provider"], f"{r['median_ms']:.2f}", f"{r['q25_ms']:.2f}", f"{r['excess_over_plain_ms']:+.2f}")
                for r in rows])
    if "ratios" in args.parts:
        rows = payload["ratios"] = ratios(args.rounds, args.blocks)
        print(f"step time, {args.blocks}-block stage at its real size:\n")
        _table(["median step ms", "x plain (paired)"],
               [(r["provider"], f"{r['median_ms']:.1f}", f"{r['x_plain']:.3f}") for r in rows])
    if "small-blocks" in args.parts:
        rows = payload["small_blocks"] = small_blocks(args.rounds)
        print("small blocks: the Glow classifier's flow (26 blocks, 64 values per sample, batch 64):\n")
        _table(["median step ms", "x plain (paired)", "x revgrad-off (paired)"],
               [(r["provider"], f"{r['median_ms']:.1f}", f"{r['x_plain']:.3f}", f"{r['x_off']:.3f}") for r in rows])
    if "small-memory" in args.parts:
        rows = payload["small_memory"] = small_memory()
        print("small blocks, memory held between forward and backward (activations of batch x 64 float32):\n")
        _table(["batch 64", "x off", "batch 256", "x off"],
               [(r["provider"], f"{r['held_b64']:.2f}", f"{r['x_off_b64']:.2f}", f"{r['held_b256']:.2f}",
                 f"{r['x_off_b256']:.2f}") for r in rows])
    if args.json:
        info = machine_info("cpu", " ".join(["python", "bench/overhead.py", *(argv or sys.argv[1:])]))
        payload = {"machine": info | {"malloc_pinned": pinned}, **payload}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
