"""Step time of a RevNet stage on CPU, every provider side by side in one run.

Usage::

    python bench/step_time.py [--blocks 12] [--rounds N] [--steps K] [--threads T] [--json PATH]

1. Checks every provider against plain autograd on one step (float64: same function and gradients;
   float32: as timed; see :class:`revnet_stage.Agreement`). A provider that disagrees stays in the
   table, marked as disagreeing.
2. Warms every provider up, then counts the bytes each holds between forward and backward
   (:class:`revgrad.tools.memory.MemoryProbe`, in units of one activation of the stage input).
3. Times ``rounds`` rounds; in each round every provider runs ``steps`` training steps in turn
   (forward, backward, ``optimizer.zero_grad``; a fresh input per step, made outside the timed
   region), the provider order rotating from round to round, so that a noisy machine slows all
   providers alike. Prints a markdown table and writes JSON (default
   ``bench/out/step_time-<time>.json``).

Columns: median, interquartile range and minimum of the wall time per step; ``× plain``: the median
over rounds of the provider's median step in the round divided by plain's median step in the same
round (paired, so drifts in machine load cancel); ``CPU ms``: median CPU time of the process per step
(all threads; with several threads it includes OpenMP spin-waiting); ``held``: bytes allocated by
forward and still held when backward starts, in activations of the stage input.

glibc's malloc thresholds are pinned first (:func:`revnet_stage.pin_malloc`; ``--default-malloc``
to keep glibc's defaults): otherwise a step's time depends on how many freed pages glibc handed back
to the kernel during the steps before it. The JSON records minor page faults per step.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from revnet_stage import (
    PROVIDERS,
    Agreement,
    StageConfig,
    TrainStep,
    compare_with_plain,
    held_bytes,
    pin_malloc,
    train_steps,
)

from revgrad.tools.measure import available_cores, load_average, machine_info, paired_ratio, quantile

OUT_DIR = Path(__file__).resolve().parent / "out"


def environment(malloc_pinned: bool, argv: Sequence[str]) -> dict[str, Any]:
    info = machine_info("cpu", " ".join(["python", "bench/step_time.py", *argv]))
    return info | {"malloc_pinned": malloc_pinned}


# --------------------------------------------------------------------------------------------------
# Measuring.


class Timer:
    """Interleaved step timings of several providers on the same data."""

    def __init__(self, steps: dict[str, TrainStep]) -> None:
        self.steps = steps
        self.wall: dict[str, list[float]] = {p: [] for p in steps}
        self.cpu: dict[str, list[float]] = {p: [] for p in steps}
        self.faults: dict[str, list[int]] = {p: [] for p in steps}
        self.rounds: list[dict[str, float]] = []

    def step(self, provider: str) -> tuple[float, float, int]:
        """One training step: (wall seconds, CPU seconds of this process, minor page faults)."""
        step = self.steps[provider]
        step.prepare()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        step.run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    def warmup(self, steps: int) -> None:
        for p in self.steps:
            for _ in range(steps):
                self.step(p)

    def run_round(self, index: int, steps: int) -> dict[str, float]:
        names = list(self.steps)
        k = index % len(names)
        medians: dict[str, float] = {}
        for p in names[k:] + names[:k]:
            gc.collect()
            measured = [self.step(p) for _ in range(steps)]
            self.wall[p] += [w for w, _, _ in measured]
            self.cpu[p] += [c for _, c, _ in measured]
            self.faults[p] += [f for _, _, f in measured]
            medians[p] = statistics.median(w for w, _, _ in measured)
        self.rounds.append(medians)
        return medians


# --------------------------------------------------------------------------------------------------
# Reporting.


def result_rows(
    timer: Timer, held: dict[str, int], agreements: dict[str, Agreement], cfg: StageConfig
) -> list[dict[str, Any]]:
    rows = []
    for p in timer.steps:
        ts = timer.wall[p]
        a = agreements.get(p)
        rows.append(
            {
                "provider": p,
                "median_ms": statistics.median(ts) * 1e3,
                "p25_ms": quantile(ts, 0.25) * 1e3,
                "p75_ms": quantile(ts, 0.75) * 1e3,
                "min_ms": min(ts) * 1e3,
                "ratio_to_plain": paired_ratio(timer.rounds, p, "plain"),
                "cpu_median_ms": statistics.median(timer.cpu[p]) * 1e3,
                "page_faults_median": statistics.median(timer.faults[p]),
                "held_bytes": held[p],
                "held_activations": held[p] / cfg.activation_bytes,
                "agrees": None if a is None else a.ok,
                "agreement": None if a is None else asdict(a),
                "times_ms": [t * 1e3 for t in ts],
                "cpu_times_ms": [t * 1e3 for t in timer.cpu[p]],
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| provider | median ms | IQR ms | min ms | × plain | CPU ms | held (activations) | agrees with plain |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        agrees = {None: "not checked", True: "yes", False: "**NO**"}[r["agrees"]]
        lines.append(
            f"| {r['provider']} | {r['median_ms']:.1f} | {r['p25_ms']:.1f}–{r['p75_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['ratio_to_plain']:.2f} | {r['cpu_median_ms']:.1f} | {r['held_activations']:.2f} | {agrees} |"
        )
    return "\n".join(lines)


def targets(rounds: list[dict[str, float]], providers: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """The stage's speed targets, from paired per-round ratios: (values, printable lines)."""
    values: dict[str, float] = {}
    lines: list[str] = []

    def check(num: str, den: str, bound: float, strict: bool) -> None:
        if num not in providers or den not in providers:
            return
        v = values[f"{num} / {den}"] = paired_ratio(rounds, num, den)
        met = v < bound if strict else v <= bound
        lines.append(
            f"{num} / {den} = {v:.2f} (target {'<' if strict else '<='} {bound:g}: {'met' if met else 'NOT met'})"
        )

    check("revgrad-off", "plain", 1.35, strict=False)
    check("revgrad-off", "memcnn", 1.0, strict=True)
    check("revgrad-off", "revlib", 1.0, strict=True)
    check("revgrad-correct", "revgrad-off", 1.10, strict=False)
    return values, lines


# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=12, help="couplings in the stage (default 12)")
    p.add_argument("--batch", type=int, default=StageConfig.batch)
    p.add_argument("--channels", type=int, default=StageConfig.channels)
    p.add_argument("--size", type=int, default=StageConfig.size, help="height = width of the input")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    p.add_argument("--steps", type=int, default=2, help="steps per provider per round (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per provider first (default 3)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    p.add_argument("--json", type=Path, default=None, help="where to write the JSON (default bench/out/)")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's trimming (see revnet_stage.pin_malloc)")
    p.add_argument("--skip-check", action="store_true", help="skip the agreement check (not for reporting)")
    args = p.parse_args(argv)
    if "plain" not in args.providers:
        args.providers.insert(0, "plain")  # every ratio is to plain autograd
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    pinned = False if args.default_malloc else pin_malloc()
    # memcnn 1.5.2 frees its input with the deprecated TypedStorage API, once per block and step.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
    torch.set_num_threads(args.threads or available_cores())
    threads = torch.get_num_threads()
    cfg = StageConfig(blocks=args.blocks, batch=args.batch, channels=args.channels, size=args.size)
    providers: list[str] = args.providers

    env = environment(pinned, argv)
    print(f"revgrad {env['revision'] or env['revgrad']} | memcnn {env['memcnn']} | revlib {env['revlib']}")
    print(f"torch {env['torch']} | CPU {env['cpu']} | cores {env['cores']} | torch threads {threads}")
    print(f"glibc malloc thresholds pinned: {pinned}")
    print(
        f"stage: {cfg.blocks} additive couplings, input {list(cfg.input_shape)} fp32, "
        f"branch BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 on {cfg.channels // 2} channels; "
        f"1 activation = {cfg.activation_bytes / 2**20:.2f} MiB"
    )
    print(f"load average at start: {env['loadavg_start']}")
    load = env["loadavg_start"][:1]
    if load and load[0] > 0.5 * env["cores"]:
        print(
            f"WARNING: load average {load[0]:.1f} on {env['cores']} cores: other processes compete for the CPU"
            + (", and OpenMP regions wait for descheduled threads" if threads > 1 else "")
            + "; step times will be noisy."
        )

    agreements: dict[str, Agreement] = {}
    if not args.skip_check:
        print("\nagreement with plain autograd (one step from the same weights):")
        agreements = compare_with_plain(cfg, tuple(providers))
        for a in agreements.values():
            print("  " + a.summary())

    timer = Timer(train_steps(cfg, tuple(providers)))
    timer.warmup(args.warmup)
    held = {p: held_bytes(step) for p, step in timer.steps.items()}
    for r in range(args.rounds):
        medians = timer.run_round(r, args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{p} {medians[p] * 1e3:.0f}" for p in providers))
    env["loadavg_end"] = load_average()

    rows = result_rows(timer, held, agreements, cfg)
    values, lines = targets(timer.rounds, providers)
    print()
    print(markdown_table(rows))
    print("\n".join(lines))
    print(
        "minor page faults per step (median): "
        + ", ".join(f"{r['provider']} {r['page_faults_median']:.0f}" for r in rows)
    )
    print(f"load average at end: {env['loadavg_end']}")

    path = args.json or OUT_DIR / f"step_time-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "env": env,
        "config": asdict(cfg) | {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
        "results": rows,
        "rounds_ms": [{p: t * 1e3 for p, t in r.items()} for r in timer.rounds],
        "targets": values,
    }
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
