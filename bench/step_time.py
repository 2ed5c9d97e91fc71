"""Step time of a RevNet stage on CPU, every provider side by side in one run (issue #2).

Usage::

    python bench/step_time.py [--blocks 12] [--rounds N] [--steps K] [--json PATH]

1. Checks every provider against plain autograd on one step (float64: same function and gradients;
   float32: as timed). A provider that disagrees stays in the table, marked as disagreeing.
2. Warms every provider up, then counts the bytes each holds between forward and backward
   (:class:`revgrad.memory.MemoryProbe`, in units of one activation of the stage input).
3. Times ``rounds`` rounds; in each round every provider runs ``steps`` training steps in turn
   (forward, backward, ``optimizer.zero_grad``), the provider order rotating from round to round, so
   that a noisy machine slows all providers alike. Prints a markdown table and writes JSON (default
   ``bench/out/step_time-<time>.json``).

The ratio to plain autograd is the median over rounds of the provider's median step in the round
divided by plain's median step in the same round (paired, so drifts in machine load cancel).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from revnet_stage import (
    PROVIDERS,
    Agreement,
    StageConfig,
    build,
    compare_with_plain,
    fresh_input,
    held_bytes,
    make_branches,
    make_data,
    make_optimizer,
    train_step,
)

OUT_DIR = Path(__file__).resolve().parent / "out"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def memcnn_version() -> str:
    return importlib.metadata.version("memcnn")


def revlib_version() -> str:
    return importlib.metadata.version("revlib")


def revgrad_revision() -> str:
    """``git describe --always --dirty`` of the checkout, plus the revgrad files changed since."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "revgrad", "kernels"], cwd=root, capture_output=True, text=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in changed if line.strip()]
    return rev + (f" (uncommitted: {', '.join(changed)})" if changed else "")


def quantile(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 else values[0]


def paired_ratio(rounds: list[dict[str, float]], num: str, den: str) -> float:
    """Median over rounds of ``num``'s round median divided by ``den``'s round median."""
    return statistics.median(r[num] / r[den] for r in rounds)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=12, help="couplings in the stage (default 12)")
    p.add_argument("--batch", type=int, default=StageConfig.batch)
    p.add_argument("--channels", type=int, default=StageConfig.channels)
    p.add_argument("--size", type=int, default=StageConfig.size, help="height = width of the input")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--steps", type=int, default=3, help="steps per provider per round (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per provider first (default 3)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    p.add_argument("--json", type=Path, default=None, help="where to write the JSON (default bench/out/)")
    p.add_argument("--skip-check", action="store_true", help="skip the agreement check (not for reporting)")
    args = p.parse_args(argv)
    if "plain" not in args.providers:
        args.providers.insert(0, "plain")  # every ratio is to plain autograd
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # memcnn 1.5.2 frees its input with the deprecated TypedStorage API, once per block and step.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    cfg = StageConfig(blocks=args.blocks, batch=args.batch, channels=args.channels, size=args.size)
    providers: list[str] = args.providers
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": available_cores(),
        "threads": torch.get_num_threads(),
        "revgrad": revgrad_revision(),
        "memcnn": memcnn_version(),
        "revlib": revlib_version(),
        "loadavg_start": load_average(),
        "command": " ".join(["python", "bench/step_time.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"revgrad {env['revgrad']} | memcnn {env['memcnn']} | revlib {env['revlib']}")
    print(f"torch {env['torch']} | CPU {env['cpu']} | cores {env['cores']} | torch threads {env['threads']}")
    print(
        f"stage: {cfg.blocks} additive couplings, input {list(cfg.input_shape)} fp32, "
        f"branch BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 on {cfg.channels // 2} channels; "
        f"1 activation = {cfg.activation_bytes / 2**20:.2f} MiB"
    )
    print(f"load average at start: {env['loadavg_start']}")
    busy = env["loadavg_start"][:1]
    if busy and busy[0] > 0.5 * env["cores"]:
        print(
            f"WARNING: load average {busy[0]:.1f} on {env['cores']} cores: other processes compete for the CPU"
            + (", and OpenMP regions wait for descheduled threads" if threads > 1 else "")
            + "; step times will be noisy."
        )

    agreements: dict[str, Agreement] = {}
    if not args.skip_check:
        print("\nagreement with plain autograd (one step from the same weights):")
        agreements = compare_with_plain(cfg, tuple(providers))
        for a in agreements.values():
            print("  " + a.summary())

    branches = make_branches(cfg)
    x, grad_out = make_data(cfg)
    stages = {p: build(p, branches) for p in providers}
    optimizers = {p: make_optimizer(s) for p, s in stages.items()}
    for s in stages.values():
        s.module.train()

    def step(p: str) -> tuple[float, float]:
        """One training step: (wall seconds, CPU seconds of this process)."""
        _leaf, h = fresh_input(x)
        c0, t0 = time.process_time(), time.perf_counter()
        train_step(stages[p], h, grad_out, optimizers[p])
        return time.perf_counter() - t0, time.process_time() - c0

    for p in providers:
        for _ in range(args.warmup):
            step(p)
    held = {p: held_bytes(stages[p], x, grad_out) for p in providers}

    times: dict[str, list[float]] = {p: [] for p in providers}
    cpu_times: dict[str, list[float]] = {p: [] for p in providers}
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = providers[r % len(providers) :] + providers[: r % len(providers)]
        this_round: dict[str, float] = {}
        for p in order:
            gc.collect()
            wall_cpu = [step(p) for _ in range(args.steps)]
            ts = [w for w, _ in wall_cpu]
            times[p].extend(ts)
            cpu_times[p].extend(c for _, c in wall_cpu)
            this_round[p] = statistics.median(ts)
        rounds.append(this_round)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{p} {this_round[p] * 1e3:.0f}" for p in providers))
    env["loadavg_end"] = load_average()

    rows = []
    for p in providers:
        ts = times[p]
        a = agreements.get(p)
        rows.append(
            {
                "provider": p,
                "median_ms": statistics.median(ts) * 1e3,
                "p25_ms": quantile(ts, 0.25) * 1e3,
                "p75_ms": quantile(ts, 0.75) * 1e3,
                "min_ms": min(ts) * 1e3,
                "ratio_to_plain": paired_ratio(rounds, p, "plain"),
                "cpu_median_ms": statistics.median(cpu_times[p]) * 1e3,
                "held_bytes": held[p],
                "held_activations": held[p] / cfg.activation_bytes,
                "agrees": None if a is None else a.ok,
                "agreement": None if a is None else asdict(a),
                "times_ms": [t * 1e3 for t in ts],
                "cpu_times_ms": [t * 1e3 for t in cpu_times[p]],
            }
        )

    print()
    print(markdown_table(rows))
    summary = targets(rounds, providers)
    for line in summary["lines"]:
        print(line)
    print(f"load average at end: {env['loadavg_end']}")

    path = args.json or OUT_DIR / f"step_time-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "env": env,
        "config": asdict(cfg) | {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
        "results": rows,
        "rounds_ms": [{p: t * 1e3 for p, t in r.items()} for r in rounds],
        "targets": summary["values"],
    }
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
    return 0


def markdown_table(rows: list[dict]) -> str:
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


def targets(rounds: list[dict[str, float]], providers: list[str]) -> dict:
    """The issue's targets, from paired per-round ratios."""
    values: dict[str, float] = {}
    lines: list[str] = []
    if "revgrad-off" in providers:
        v = values["revgrad-off / plain"] = paired_ratio(rounds, "revgrad-off", "plain")
        lines.append(f"revgrad-off / plain = {v:.2f} (target <= 1.35: {'met' if v <= 1.35 else 'NOT met'})")
        for peer in ("memcnn", "revlib"):
            if peer in providers:
                v = values[f"revgrad-off / {peer}"] = paired_ratio(rounds, "revgrad-off", peer)
                lines.append(f"revgrad-off / {peer} = {v:.2f} (target < 1: {'met' if v < 1 else 'NOT met'})")
        if "revgrad-correct" in providers:
            v = values["revgrad-correct / revgrad-off"] = paired_ratio(rounds, "revgrad-correct", "revgrad-off")
            lines.append(
                f"revgrad-correct / revgrad-off = {v:.2f} (target <= 1.10: {'met' if v <= 1.10 else 'NOT met'})"
            )
    return {"values": values, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
