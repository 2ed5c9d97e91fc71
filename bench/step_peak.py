"""Held and peak bytes of one training step of the RevNet stage, for one provider, in a fresh process.

    for p in revgrad-off revgrad-correct revlib memcnn; do python bench/step_peak.py $p --blocks 32; done

One provider per process on purpose: measured one after another in one process, a later provider's
count drops whenever garbage of an earlier one is freed during its step. Bytes from glibc
(``revgrad.tools.measure.step_memory``), above the level before the step.
"""

from __future__ import annotations

import argparse
import sys

import torch

from revgrad.tools.benchmark import PROVIDERS, TrainStep, revnet_stage
from revgrad.tools.measure import step_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("provider", choices=PROVIDERS)
    parser.add_argument("--blocks", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workload = revnet_stage(blocks=args.blocks)
    stats = step_memory(TrainStep(workload.build(args.provider), workload.input()))
    shape = "x".join(map(str, workload.input_shape))
    print(f"{args.provider} {args.blocks} blocks, input [{shape}]: held {stats.held_bytes / 2**20:.2f} MiB, "
          f"peak {stats.peak_bytes / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
