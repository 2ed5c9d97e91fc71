"""What deferring the reconstruction checks buys: one host sync per backward instead of one per block.

    python bench/deferred_checks.py --device cuda            # the measurement (part of bench/gpu_suite.sh)
    python bench/deferred_checks.py --device cpu --rounds 1  # smoke run: on CPU a check costs no sync

The RevNet stage (``revgrad.tools.benchmark.revnet_stage``) with ``check="correct"``, timed with the engine's
checks read block by block (``REVGRAD_DEFER_CHECKS=never``) and deferred to the end of the pass
(``always``), interleaved with plain autograd round by round; ratios paired per round. Both variants
compute the same gradients (checked first, float32, against each other). On CUDA ``auto`` is
``always`` while the chain's previous backward was clean, which it is here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import torch

from revgrad.engine import backprop as engine
from revgrad.tools.benchmark import TrainStep, revnet_stage
from revgrad.tools.measure import machine_info, pin_malloc, time_interleaved


@contextlib.contextmanager
def deferring(mode: str) -> Iterator[None]:
    """Run with ``engine.DEFER_CHECKS`` set to ``mode`` (restored after)."""
    old, engine.DEFER_CHECKS = engine.DEFER_CHECKS, mode
    try:
        yield
    finally:
        engine.DEFER_CHECKS = old


class Deferral:
    """A training step run with the checks deferred (``"always"``) or read per block (``"never"``)."""

    def __init__(self, step: TrainStep, mode: str) -> None:
        self.step = step
        self.mode = mode

    def prepare(self) -> None:
        self.step.prepare()

    def run(self) -> None:
        with deferring(self.mode):
            self.step.run()


def same_gradients(workload, device: torch.device) -> float:
    """Largest relative difference between the two variants' parameter gradients after one step."""
    grads = []
    for mode in ("never", "always"):
        stage = workload.build("revgrad-correct", device=device)
        step = TrainStep(stage, workload.input(device=device))
        with deferring(mode):
            step.run()  # the first backward probes the VJPs' sensitivity, checking per block
            step.prepare()
            step.backward(step.forward(), zero_grad=False)
        report = stage.module.last_report
        if report.deferred != (mode == "always") or report.rerun:
            raise RuntimeError(f"deferral {mode!r} did not run as asked: {report}")
        grads.append([p.grad.detach().clone() for p in stage.module.parameters()])
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(*grads))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, the stage's 32 on CPU")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for deferred_checks.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
        pin_malloc()
    sizes: dict[str, Any] = {"blocks": args.blocks}
    if args.batch or device.type == "cuda":
        sizes["batch"] = args.batch or 64
    workload = revnet_stage(**sizes)
    difference = same_gradients(workload, device)
    steps = {
        "plain": TrainStep(workload.build("plain", device=device), workload.input(device=device)),
        "correct, per-block checks": Deferral(
            TrainStep(workload.build("revgrad-correct", device=device), workload.input(device=device)), "never"
        ),
        "correct, deferred checks": Deferral(
            TrainStep(workload.build("revgrad-correct", device=device), workload.input(device=device)), "always"
        ),
    }
    timings = time_interleaved(steps, rounds=args.rounds, per_round=3, warmup=2, device=device)
    rows = [
        {"provider": p, "median_ms": timings.median_ms(p), "x_plain": timings.ratio(p)} for p in steps
    ]
    print(f"{workload.description} on {device}; gradients of the two variants differ by {difference:.2e} (relative)\n")
    print("| provider | median step ms | x plain (paired) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['provider']} | {r['median_ms']:.2f} | {r['x_plain']:.3f} |")
    if args.out:
        info = machine_info(device.type, " ".join(["python", "bench/deferred_checks.py", *(argv or sys.argv[1:])]))
        with open(f"{args.out}/deferred_checks.json", "w") as fh:
            json.dump({"machine": info, "gradient_difference": difference, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
