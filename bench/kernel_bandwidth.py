"""Bandwidth of the fused coupling ops on a GPU: triton vs eager vs torch.compile, and the copy ceiling.

    python bench/kernel_bandwidth.py --out results/         # needs CUDA; writes kernels.json, kernels.md
    TRITON_INTERPRET=1 python bench/kernel_bandwidth.py --out /tmp/k --dry-run   # CPU: plumbing only

For every op of ``bench/kernel_ops.py`` and dtype: median time (``triton.testing.do_bench``, L2
flushed between runs), GB/s over the op's minimum traffic, GB/s as a share of the device's measured
copy bandwidth (``dst.copy_(src)`` on the same number of bytes), and the speedup over
``torch.compile`` of the same math. Outputs are checked against eager before anything is timed.
The copy bandwidth is measured first, and kernels.json / kernels.md are rewritten after every row,
so a run cut short keeps what it measured.

``--dry-run`` runs the same code on the CPU at a tiny shape: the kernels through Triton's
interpreter, ``torch.compile`` with dynamo's "eager" backend, one timed call per case. Its numbers
mean nothing; it proves the script works before a GPU runs it (``bench/gpu_suite.sh --dry-run``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import kernel_ops
import torch
from kernel_ops import OPS, PROVIDERS, case, make_inputs, outputs_agree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DRY_SHAPE = (2, 4, 8, 8)


def bench_ms(device: str) -> Callable[..., float]:
    """``ms(fn, warmup, rep)``: ``triton.testing.do_bench`` on CUDA; one timed call on the CPU (dry run)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn, warmup, rep: do_bench(fn, warmup=warmup, rep=rep)

    def once(fn, warmup, rep):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def copy_bandwidth(nbytes: int, device: str = "cuda") -> float:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` (read + write) on ``device``."""
    n = nbytes // 2 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(device)(lambda: dst.copy_(src), 25, 200)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def measure(shape: tuple[int, ...], dtypes: list[str], providers: list[str], device: str = "cuda",
            on_row: Callable[[dict], None] = lambda row: None) -> dict:
    ms_of = bench_ms(device)
    rows = []
    for dname in dtypes:
        inputs = make_inputs(shape, DTYPES[dname], device)
        for op in OPS:
            for provider in providers:
                err = outputs_agree(op, inputs, provider)
                tol = 1e-5 if dname == "float32" else 2e-2
                run = case(op, provider, inputs)
                row = {"op": op, "dtype": dname, "provider": provider, "bytes": run.nbytes, "max_rel_error": err}
                if err > tol:
                    row["skipped"] = f"outputs differ from eager by {err:.3g}"
                else:
                    ms = ms_of(run.run, 25, 100)
                    row.update(ms=ms, gbps=run.nbytes / (ms * 1e-3) / 1e9)
                rows.append(row)
                on_row(row)
                print(f"{dname:9s} {op:16s} {provider:8s} " + (f"{row['gbps']:8.1f} GB/s" if "gbps" in row
                                                                 else row["skipped"]), file=sys.stderr)
    return {"rows": rows}


def _num(value: float | None) -> str:
    return f"{value:.0f}" if value else "–"


def markdown(result: dict) -> str:
    """The table: per op and dtype, the bytes it must move, the time that takes at the measured copy
    bandwidth (its roofline), and each provider's GB/s."""
    copy_gbps = result["copy_gbps"]
    lines = [
        f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}; shape {result['shape']}"
        + ("." if result.get("complete", True) else " (incomplete: the run stopped here)."),
        f"Copy bandwidth (`dst.copy_(src)`, {result['copy_bytes'] / 2**30:.2f} GiB moved): {copy_gbps:.0f} GB/s.",
        "",
        "| op | dtype | MiB moved | µs at copy bandwidth | triton µs | triton GB/s | % of copy | eager GB/s "
        "| compile GB/s | triton vs compile |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["op"], r["dtype"], r["provider"]): r for r in result["rows"]}
    for dname in result["dtypes"]:
        for op in OPS:
            cell = {p: by.get((op, dname, p), {}) for p in PROVIDERS}
            nbytes = next((c["bytes"] for c in cell.values() if "bytes" in c), None)
            if nbytes is None:
                continue
            g = {p: c.get("gbps") for p, c in cell.items()}
            share = f"{100 * g['triton'] / copy_gbps:.0f} %" if g["triton"] else "–"
            speed = f"{cell['compile']['ms'] / cell['triton']['ms']:.2f}×" if g["triton"] and g["compile"] else "–"
            us = f"{1e3 * cell['triton']['ms']:.1f}" if g["triton"] else "–"
            lines.append(f"| {op} | {dname} | {nbytes / 2**20:.1f} | {nbytes / copy_gbps / 1e3:.1f} | {us} | "
                         f"{_num(g['triton'])} | {share} | {_num(g['eager'])} | {_num(g['compile'])} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels.json and kernels.md")
    parser.add_argument("--shape", type=int, nargs="+", default=None, help="default 32 64 128 128 (dry run: 2 4 8 8)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shape: plumbing only")
    args = parser.parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        device = "cpu"
        kernel_ops.COMPILE_BACKEND = "eager"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("needs a CUDA device (on CPU the kernels run only in Triton's interpreter: --dry-run)")
    import triton

    start = time.time()
    shape = tuple(args.shape or (DRY_SHAPE if args.dry_run else (32, 64, 128, 128)))
    nbytes = 2 * 4 * torch.Size(shape).numel()
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: numbers mean nothing)",
        "torch": torch.__version__, "triton": triton.__version__, "shape": list(shape), "dtypes": args.dtypes,
        "copy_bytes": nbytes, "copy_gbps": copy_bandwidth(nbytes, device), "rows": [], "complete": False,
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save(row: dict | None = None) -> None:
        if row is not None:
            result["rows"].append(row)
        result["seconds"] = time.time() - start
        (args.out / "kernels.json").write_text(json.dumps(result, indent=2))
        (args.out / "kernels.md").write_text(markdown(result))

    save()
    measure(shape, args.dtypes, args.providers, device, on_row=save)
    result["complete"] = True
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
