"""Bandwidth of the fused coupling ops on a GPU: triton vs eager vs torch.compile, and the copy ceiling.

    python bench/kernel_bandwidth.py --out results/         # needs CUDA; writes kernels.json, kernels.md

For every op of ``bench/kernel_ops.py`` and dtype: median time (``triton.testing.do_bench``, L2
flushed between runs), GB/s over the op's minimum traffic, GB/s as a share of the device's measured
copy bandwidth (``dst.copy_(src)`` on the same number of bytes), and the speedup over
``torch.compile`` of the same math. Outputs are checked against eager before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from kernel_ops import OPS, PROVIDERS, case, make_inputs, outputs_agree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_bandwidth(nbytes: int) -> float:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` (read + write) on the current device."""
    from triton.testing import do_bench

    n = nbytes // 2 // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def measure(shape: tuple[int, ...], dtypes: list[str], providers: list[str]) -> dict:
    from triton.testing import do_bench

    rows = []
    for dname in dtypes:
        inputs = make_inputs(shape, DTYPES[dname], "cuda")
        for op in OPS:
            for provider in providers:
                err = outputs_agree(op, inputs, provider)
                tol = 1e-5 if dname == "float32" else 2e-2
                run = case(op, provider, inputs)
                row = {"op": op, "dtype": dname, "provider": provider, "bytes": run.nbytes, "max_rel_error": err}
                if err > tol:
                    row["skipped"] = f"outputs differ from eager by {err:.3g}"
                else:
                    ms = do_bench(run.run, warmup=25, rep=100)
                    row.update(ms=ms, gbps=run.nbytes / (ms * 1e-3) / 1e9)
                rows.append(row)
                print(f"{dname:9s} {op:16s} {provider:8s} " + (f"{row['gbps']:8.1f} GB/s" if "gbps" in row
                                                                 else row["skipped"]), file=sys.stderr)
    return {"rows": rows}


def _num(value: float | None) -> str:
    return f"{value:.0f}" if value else "–"


def markdown(result: dict) -> str:
    copy_gbps = result["copy_gbps"]
    lines = [
        f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}; shape {result['shape']}.",
        f"Copy bandwidth (`dst.copy_(src)`, {result['copy_bytes'] / 2**30:.2f} GiB moved): {copy_gbps:.0f} GB/s.",
        "",
        "| op | dtype | triton GB/s | % of copy | eager GB/s | compile GB/s | triton vs compile |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by = {(r["op"], r["dtype"], r["provider"]): r for r in result["rows"]}
    for dname in result["dtypes"]:
        for op in OPS:
            cell = {p: by.get((op, dname, p), {}) for p in PROVIDERS}
            g = {p: c.get("gbps") for p, c in cell.items()}
            share = f"{100 * g['triton'] / copy_gbps:.0f} %" if g["triton"] else "–"
            speed = f"{cell['compile']['ms'] / cell['triton']['ms']:.2f}×" if g["triton"] and g["compile"] else "–"
            lines.append(f"| {op} | {dname} | {_num(g['triton'])} | {share} | {_num(g['eager'])} | "
                         f"{_num(g['compile'])} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels.json and kernels.md")
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 128, 128])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (on CPU the kernels run only in Triton's interpreter, for tests)")
    import triton

    start = time.time()
    shape = tuple(args.shape)
    result = measure(shape, args.dtypes, args.providers)
    nbytes = 2 * 4 * torch.Size(shape).numel()
    result.update(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        shape=list(shape), dtypes=args.dtypes, copy_bytes=nbytes, copy_gbps=copy_bandwidth(nbytes),
        seconds=time.time() - start,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "kernels.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
