"""The measurements behind bench/RESULTS.md that ``revgrad bench`` does not make.

``revgrad bench`` gives memory and step time vs depth on the RevNet stage; this script gives:

    python bench/report.py batch --depth 32 --batches 4 8 16 32 64        # memory vs batch
    python bench/report.py models --batch 16 --rounds 10                  # RevNet-38/110/164, Glow stage
    python bench/report.py largest-batch --budget-mib 512 --depth 32      # largest batch in a budget

Every part prints a markdown table and writes JSON to ``bench/out/`` (``--json`` to choose; the
models part rewrites it after each model, so a run cut short keeps the models it finished). Same
providers, steps and measurements as ``revgrad bench`` (:mod:`revgrad.tools.benchrun`): memory by the
allocator (glibc on CPU, ``max_memory_allocated`` on CUDA), step times interleaved across providers
with ratios to plain autograd paired per round, one torch thread on CPU unless ``--threads``. The
float64 agreement check of the models part runs on ``--device`` (on CUDA, the engine's CUDA path).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from revgrad.tools.benchmark import (
    PROVIDERS,
    TrainStep,
    Workload,
    available_providers,
    compare_with_plain,
    glow_stage,
    revnet_model,
    revnet_stage,
)
from revgrad.tools.benchrun import bench_session, largest_batches, measure_providers, resolve_device, workload_info
from revgrad.tools.measure import machine_info, step_memory

OUT_DIR = Path(__file__).resolve().parent / "out"
MIB = 2**20
STAGE = dict(channels=32, size=16)  # the RevNet stage of bench/revnet_stage.py: one activation = batch * 32 KiB


def _providers(workload: Workload, notes: list[str]) -> list[str]:
    chosen, skipped = available_providers(workload)
    notes += [f"{workload.name}: {n}" for n in skipped]
    return chosen


def part_batch(args: argparse.Namespace, device, notes: list[str], save) -> tuple[dict[str, Any], list[str]]:
    """Held and peak bytes per provider at each batch, stage of ``--depth`` blocks (no timing)."""
    rows: dict[str, dict[str, Any]] = {}
    lines = ["| batch | " + " | ".join(f"{p} held / peak MiB" for p in PROVIDERS) + " |",
             "|---:|" + "---:|" * len(PROVIDERS)]
    for batch in args.batches:
        w = revnet_stage(blocks=args.depth, batch=batch, **STAGE)
        providers = _providers(w, notes)
        x = w.input(device=device)
        memory = {p: step_memory(TrainStep(w.build(p, device=device), x, w.seed), device) for p in providers}
        rows[str(batch)] = {p: {"held_bytes": m.held_bytes, "peak_bytes": m.peak_bytes} for p, m in memory.items()}
        cells = [f"{memory[p].held_bytes / MIB:.1f} / {memory[p].peak_bytes / MIB:.1f}" if p in memory else "-"
                 for p in PROVIDERS]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        print(f"batch {batch} done", file=sys.stderr, flush=True)
    return {"depth": args.depth, "stage": STAGE, "results": rows}, lines


def part_models(args: argparse.Namespace, device, notes: list[str], save) -> tuple[dict[str, Any], list[str]]:
    """Memory, step time and images/s per provider on RevNet-38/110/164 and a Glow stage."""
    workloads = [revnet_model(n, batch=args.batch) for n in ("revnet38", "revnet110", "revnet164")]
    workloads.append(glow_stage(steps=args.glow_steps, channels=12, size=16, hidden=args.glow_hidden,
                                batch=args.batch))
    out: dict[str, Any] = {}
    lines = ["| model | provider | held MiB | peak MiB | step ms (median) | images/s | time x plain | held % plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for w in workloads:
        if args.models and w.name.split("-")[0] not in args.models:
            continue
        providers = _providers(w, notes)
        exact = (revnet_model(w.name, batch=2, size=8) if w.name.startswith("revnet")
                 else glow_stage(steps=3, channels=12, size=4, hidden=8, batch=2))
        agreement = {p: a.ok for p, a in compare_with_plain(exact, providers, fp32=False, device=device).items()}
        rows = measure_providers(w, providers, device, args.rounds, warmup=1)
        out[w.name] = {"workload": workload_info(w, device), "agrees_fp64": agreement, "results": rows}
        for p, r in rows.items():
            flag = "" if agreement.get(p) else " (**disagrees**)"
            lines.append(f"| {w.name} | {p}{flag} | {r['held_bytes'] / MIB:.1f} | {r['peak_bytes'] / MIB:.1f} | "
                         f"{r['step_ms']:.0f} | {r['images_per_s']:.1f} | {r['ratio']:.2f} | "
                         f"{100 * r['held_ratio']:.1f} |")
        save(out, lines)
        print(f"{w.name} done", file=sys.stderr, flush=True)
    return out, lines


def part_largest(args: argparse.Namespace, device, notes: list[str], save) -> tuple[dict[str, Any], list[str]]:
    """Per provider, the largest batch whose step (input + peak bytes) fits ``--budget-mib``."""
    w = revnet_stage(blocks=args.depth, batch=1, **STAGE)
    providers = _providers(w, notes)
    budget = int(args.budget_mib * MIB)

    def probe(p: str, b: int, ok: bool) -> None:
        print(f"  {p}: batch {b} {'fits' if ok else 'does not fit'}", file=sys.stderr, flush=True)

    found = largest_batches(w, providers, budget, device, tolerance=args.tolerance, on_probe=probe)
    lines = ["| provider | largest batch | x plain |", "|---|---:|---:|"]
    lines += [f"| {p} | {b} | {b / found['plain']:.1f} |" for p, b in found.items()]
    return {"budget_bytes": budget, "depth": args.depth, "stage": STAGE, "tolerance": args.tolerance,
            "batch": found}, lines


PARTS = {"batch": part_batch, "models": part_models, "largest-batch": part_largest}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--depth", type=int, default=32, help="stage blocks (batch, largest-batch; default 32)")
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="batch part")
    p.add_argument("--batch", type=int, default=16, help="models part (default 16)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds (models part; default 10)")
    p.add_argument("--models", nargs="+", choices=["revnet38", "revnet110", "revnet164", "glow"], default=None)
    p.add_argument("--glow-steps", type=int, default=16)
    p.add_argument("--glow-hidden", type=int, default=128)
    p.add_argument("--budget-mib", type=float, default=512.0, help="largest-batch part (default 512)")
    p.add_argument("--tolerance", type=float, default=1 / 32, help="largest-batch: relative resolution")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    notes: list[str] = []
    path = args.json or OUT_DIR / f"report-{args.part}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(data: dict[str, Any], lines: list[str], complete: bool = False) -> None:
        path.write_text(json.dumps({"machine": machine, "part": args.part, "notes": notes, "complete": complete,
                                    **data, "table": lines}, indent=1, default=str))

    with bench_session(device, args.threads) as pinned:
        machine = machine_info(device, shlex.join(["python", "bench/report.py", *argv])) | {"malloc_pinned": pinned}
        started = time.perf_counter()
        data, lines = PARTS[args.part](args, device, notes, save)
        machine["seconds"] = round(time.perf_counter() - started, 1)
    gpu = f" ({machine['gpu']})" if machine["gpu"] else ""
    print(f"{machine['command']}\nCPU {machine['cpu']}, {machine['threads']} torch thread(s), device "
          f"{machine['device']}{gpu}, torch {machine['torch']}, triton {machine['triton']}, {machine['seconds']} s\n")
    print("\n".join(lines))
    for n in dict.fromkeys(notes):
        print(f"note: {n}")
    save(data, lines, complete=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
