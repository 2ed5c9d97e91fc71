"""What ``graph_budget`` buys: step time and held memory vs kept blocks.

    python bench/graph_budget.py                      # 12-block RevNet stage, CPU, 1 thread
    python bench/graph_budget.py --keep 0 2 4 --rounds 15 --json bench/out/graph-budget.json

The stage is ``revgrad.tools.benchmark.revnet_stage`` (the one of ``revgrad bench`` and ``bench/step_time.py``).
Providers, interleaved in every round: plain autograd, RevLib (when installed), revgrad
``check="correct"`` without a budget, and with a budget that holds the top ``k`` blocks' graphs
(measured by the engine itself, see ``revgrad/graph_budget.py``). Reported: median step, paired
ratio to plain, bytes held between forward and backward in activations, the blocks kept.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from revgrad.tools.benchmark import TrainStep, revnet_stage, unavailable
from revgrad.tools.measure import machine_info, pin_malloc, step_memory, time_interleaved


def graph_bytes(workload) -> tuple[int, int]:
    """(bytes of one block's graph, bytes of one block input), as the engine measures them."""
    stage = workload.build("revgrad-correct")
    stage.module.configure(graph_budget=1 << 62)
    TrainStep(stage, workload.input()).run()
    graphs = stage.module._graphs
    top = max(graphs.sizes)
    return graphs.sizes[top], graphs.inputs[top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pinned = pin_malloc()
    workload = revnet_stage()
    graph, boundary = graph_bytes(workload)
    steps = {}
    for name in ("plain", "revlib", "revgrad-correct"):
        if unavailable(name, workload) is None:
            steps[name] = TrainStep(workload.build(name), workload.input())
    for k in args.keep:
        stage = workload.build("revgrad-correct")
        stage.module.configure(graph_budget=k * graph + boundary)
        steps[f"revgrad-correct keep {k}"] = TrainStep(stage, workload.input())
    memory = {name: step_memory(step) for name, step in steps.items()}  # also measures the graphs
    timings = time_interleaved(steps, rounds=args.rounds, per_round=2, warmup=1)
    act = workload.activation_bytes()
    rows = []
    for name, step in steps.items():
        kept = getattr(step.stage.module, "kept_blocks", None)
        rows.append({
            "provider": name, "step_ms": timings.median_ms(name), "x_plain": timings.ratio(name),
            "held_activations": memory[name].held_bytes / act, "kept_blocks": kept,
        })
    print(f"{workload.description}; graph of one block {graph / act:.2f} activations; "
          f"{args.threads} thread(s), {args.rounds} rounds")
    print("| provider | median step ms | × plain (paired) | held (activations) | kept blocks |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['provider']} | {r['step_ms']:.1f} | {r['x_plain']:.2f} | {r['held_activations']:.2f} | "
              f"{r['kept_blocks'] if r['kept_blocks'] is not None else '–'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine_info("cpu", " ".join(sys.argv)) | {"malloc_pinned": pinned},
                       "graph_bytes": graph, "rows": rows, "rounds": timings.rounds}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
