"""Every kernel specialization the launchers make, compiled ahead of time for CUDA, with its registers.

    python bench/kernel_aot.py                                   # sm_80 and sm_90: a table per kernel
    python bench/kernel_aot.py --json out.json --markdown out.md --arch 80 90 --jobs 2

No GPU is needed, and no kernel runs:

1. **Record.** The launchers of ``revgrad.kernels`` run on CPU tensors over :data:`STORAGE` (the
   storage dtypes, autocast's mixed float32 input with a bf16 conditioner output included),
   the scale kinds, fingerprint on/off, the residual's add/subtract and fingerprint modes, and two
   geometries (:data:`GEOMETRIES`), while ``JITFunction.run`` records each launch instead of
   launching it. What Triton would compile is then known exactly: its own binder turns the recorded
   arguments into the signature, the constexprs and the divisibility attributes.
2. **Compile.** Each distinct specialization, for each target, with
   ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
   in ``--jobs`` processes (a fresh Triton cache, so every cubin is built here). Registers per thread
   and spill bytes are read from ``ptxas -v``: the log of the ptxas bundled in the Triton wheel, run
   by Triton on the PTX as it builds the cubin.
3. **Check.** Every kernel launched in ``kernels/`` (``name[grid](...)``) must have been recorded,
   every public launcher called, every grid within CUDA's limits (x < 2**31, y and z <= 65535),
   every specialization compiled without spills. The exit status says whether all held;
   ``tests/test_kernels_aot.py`` runs this script and asserts the same with the details.

A kernel added later without a case in :func:`launcher_calls` fails step 3. Works with Triton 3.6
and 3.9 (same ``ASTSource``/``GPUTarget``/binder API).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ARCHS = (80, 90)
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535
# Storage dtypes: (block tensor x/y/a/out/gy, conditioner output h / residual r). The mixed rows are
# autocast: the block input stays float32 while the conditioner computes in bf16.
STORAGE = {
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
    "fp32+bf16": ("float32", "bfloat16"),
    "fp16": ("float16", "float16"),
}
# (name, shape, storage rows with every mode, rows with the heaviest modes only). "wide" is a typical
# activation (D = 64 * 32 * 32: every int divisible by 16, 8 chunks per program); "tall" has a
# 2-element sample and a batch past CUDA's limit of 65535 on grid axes y and z (odd ints, one chunk
# per program). Heaviest modes: the fingerprint folded in, sigmoid scale, a log-determinant gradient.
# fp16 compiles as bf16 does, down to the register counts: its full matrix would double the run (and
# the limit of a minute) for nothing. Not compiled: fp32+fp16 (each pointer's dtype is compiled in
# another row, and the kernels treat pointers independently).
GEOMETRIES = (
    ("wide", (2, 64, 32, 32), ("fp32", "bf16", "fp32+bf16"), ("fp16",)),
    ("tall", (70_000, 2), (), ("fp32",)),
)
KIND_NAMES = ("sigmoid", "exp", "bounded")


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments, the grid, and the case label."""

    module: str
    kernel: str
    fn: Any
    args: tuple
    kwargs: dict
    grid: tuple
    label: str


@dataclasses.dataclass
class Spec:
    """One specialization as Triton's binder sees it (per target; same for sm_80 and sm_90)."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, sorted(map(repr, self.constexprs.items())),
                           sorted(map(repr, self.attrs.items())), self.options], sort_keys=True)


# --------------------------------------------------------------------------------------------------
# 1. Record


def _kernels_package():
    import triton

    kernels = importlib.import_module("revgrad.kernels")
    jit = triton.runtime.jit.JITFunction
    for name in ("fingerprint", "residual", "affine_forward"):
        launcher = getattr(kernels, name)
        module = sys.modules[launcher.__module__]
        if not any(isinstance(v, jit) for v in vars(module).values()):
            raise RuntimeError("revgrad.kernels was imported under TRITON_INTERPRET=1: its kernels are not "
                               "JIT functions; run this script in a process without it")
    return kernels


def discover(kernels) -> dict[str, dict[str, Any]]:
    """Every ``@triton.jit`` function of the kernels package: ``{module.name: {launched: bool}}``.

    A function is *launched* (a kernel, not a device helper) when its module calls ``name[grid](...)``.
    """
    import triton

    found: dict[str, dict[str, Any]] = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        tree = ast.parse(inspect.getsource(module))
        launched = {node.func.value.id for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)}
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = {"launched": name in launched}
    return found


def launcher_calls(kernels) -> Iterator[tuple[str, Callable[[], object]]]:
    """``(label, call)`` for every launcher over the dtype / mode / geometry matrix (CPU tensors)."""
    import torch

    from revgrad.ops.fingerprint import sign_tables

    gen = torch.Generator().manual_seed(0)
    for geometry, shape, full_rows, heavy_rows in GEOMETRIES:
        batch, channels, rest = shape[0], shape[1], shape[2:]
        c1, c2 = channels // 2, channels - channels // 2
        tables = sign_tables(int(torch.Size(shape[1:]).numel()), torch.device("cpu"))
        split = c1 * int(torch.Size(rest).numel())
        for row in (*full_rows, *heavy_rows):
            full = row in full_rows
            big, small = (getattr(torch, n) for n in STORAGE[row])
            x = torch.randn(shape, generator=gen).to(big)
            h = torch.randn((batch, 2 * c2, *rest), generator=gen).to(small)
            r1 = torch.randn((batch, c1, *rest), generator=gen).to(small)
            r2 = torch.randn((batch, c2, *rest), generator=gen).to(small)
            gld = torch.randn(batch, generator=gen)
            tag = f"{geometry} {row}"
            if big == small:
                yield tag, lambda x=x, t=tables: kernels.fingerprint(x, *t)
            for kind in KIND_NAMES if full else KIND_NAMES[:1]:
                for fp in (True, False) if full else (True,):
                    t = tables if fp else None
                    mode = f"{kind}{' fingerprint' if fp else ''}"
                    yield f"{tag} {mode}", lambda x=x, h=h, k=kind, t=t: kernels.affine_forward(x, h, k, 1.7, t)
                    yield f"{tag} {mode}", lambda x=x, h=h, k=kind, t=t: kernels.affine_inverse(x, h, k, 1.7, t)
                for g in (gld, None) if full else (gld,):
                    yield (f"{tag} {kind}{' dlogdet' if g is not None else ''}",
                           lambda x=x, h=h, k=kind, g=g: kernels.affine_backward(x, h, x, g, k, 1.7))
            # The coupling's forward adds (fingerprint of a), its inverse subtracts (of out); none with
            # check="off".
            modes = [(False, kernels.FP_OF_A), (True, kernels.FP_OF_OUT)]
            modes += [(False, kernels.FP_NONE), (True, kernels.FP_NONE)] if full else []
            for subtract, fp_of in modes:
                t = tables if fp_of != kernels.FP_NONE else None
                mode = f"{'subtract' if subtract else 'add'} {['', 'fp-of-a', 'fp-of-out'][fp_of]}".strip()
                for r, offset in ((r1, 0), (r2, split)):
                    yield (f"{tag} {mode}", lambda x=x, r=r, o=offset, s=subtract, f=fp_of, t=t:
                           kernels.residual(x, r, torch.empty_like(x), o, s, f, t))


@contextlib.contextmanager
def recording(launches: list[Launch], label: list[str]) -> Iterator[None]:
    """Make ``JITFunction.run`` record launches (nothing runs; outputs stay uninitialized)."""
    import triton

    jit = triton.runtime.jit.JITFunction
    original = jit.run

    def record(self, *args, grid, warmup, **kwargs):
        grid = grid(dict(zip(self.arg_names, args))) if callable(grid) else grid
        launches.append(Launch(self.fn.__module__, self.fn.__name__, self, args, kwargs, tuple(grid), label[0]))

    jit.run = record
    try:
        yield
    finally:
        jit.run = original


def record(kernels) -> tuple[list[Launch], set[str]]:
    """Run every launcher case with launches recorded; returns the launches and the launchers called."""
    launches: list[Launch] = []
    called: set[str] = set()
    label = [""]
    public = {n: getattr(kernels, n) for n in kernels.__all__ if inspect.isfunction(getattr(kernels, n))}
    originals = dict(public)

    def counting(name: str, fn: Callable) -> Callable:
        def call(*a, **k):
            called.add(name)
            return fn(*a, **k)
        return call

    for name, fn in public.items():
        setattr(kernels, name, counting(name, fn))
    try:
        with recording(launches, label):
            for case, call in launcher_calls(kernels):
                label[0] = case
                before = len(launches)
                call()
                for launch in launches[before:]:
                    launch.label = f"{launch.kernel.strip('_').removesuffix('_kernel')} {case}"
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    return launches, called


def specialize(launch: Launch, cc: int) -> Spec:
    """Triton's own binder on the recorded arguments: what ``kernel[grid](...)`` would compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.kwargs), bound, specialization, options)
    names = {p.name for p in fn.params}
    opts = {k: v for k, v in launch.kwargs.items() if k not in names}
    return Spec(launch.module, launch.kernel, dict(signature), dict(constexprs), dict(attrs), opts, launch.label)


def grid_problems(launches: list[Launch]) -> list[str]:
    """Launches whose grid CUDA would refuse (x < 2**31, y and z <= 65535, each >= 1)."""
    bad = []
    for launch in launches:
        g = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        if len(launch.grid) > 3 or g[0] > GRID_X_MAX or max(g[1:]) > GRID_YZ_MAX or min(g) < 1:
            bad.append(f"{launch.label}: grid {launch.grid}")
    return bad


# --------------------------------------------------------------------------------------------------
# 2. Compile


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n"
                    r".*?Used (\d+) registers", re.S)


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers per thread, stack frame and spill bytes from a ``ptxas -v`` log (one entry function)."""
    m = _PTXAS.search(log)
    if not m:
        raise ValueError(f"no register usage in the ptxas log:\n{log}")
    stack, stores, loads, regs = map(int, m.groups())
    return {"registers": regs, "stack": stack, "spill_stores": stores, "spill_loads": loads}


def compile_one(job: tuple[str, str, dict, dict, dict, dict, int]) -> dict[str, Any]:
    """Compile one specialization for ``sm_<cc>``; returns ptxas's figures (or the error)."""
    module, kernel, signature, constexprs, attrs, options, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), kernel)
    start = time.perf_counter()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                                      options=options)
        result = parse_ptxas(out.getvalue())
        result["ptx_target"] = re.search(r"\.target\s+(\S+)", compiled.asm["ptx"]).group(1)
    except Exception as exc:  # reported per specialization, not hidden
        result = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _ptxas_versions() -> dict[str, str]:
    import triton

    out = {}
    for path in sorted((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*")):
        try:
            text = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
            out[path.name] = text.strip().splitlines()[-2] if text.strip() else "?"
        except (OSError, subprocess.SubprocessError) as exc:
            out[path.name] = f"unavailable: {exc}"
    return out


def run(archs: tuple[int, ...], jobs: int) -> dict[str, Any]:
    """Record, compile and check; returns everything as one JSON-able dict."""
    start = time.perf_counter()
    import torch
    import triton

    torch.set_num_threads(1)
    kernels = _kernels_package()
    found = discover(kernels)
    launches, called = record(kernels)
    specs: dict[str, Spec] = {}
    for launch in launches:
        spec = specialize(launch, archs[0])
        specs.setdefault(spec.key(), spec)
    recorded = time.perf_counter() - start
    order = [(spec, cc) for spec in specs.values() for cc in archs]
    work = [(s.module, s.kernel, s.signature, s.constexprs, s.attrs, s.options, cc) for s, cc in order]
    if jobs > 1:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            outcomes = list(pool.map(compile_one, work))
    else:
        outcomes = [compile_one(job) for job in work]
    rows = []
    for (spec, cc), outcome in zip(order, outcomes):
        rows.append({"kernel": spec.kernel, "module": spec.module, "label": spec.label, "arch": f"sm_{cc}",
                     "signature": spec.signature, "constexprs": {str(k): repr(v) for k, v in spec.constexprs.items()},
                     "attrs": {str(k): v for k, v in spec.attrs.items()}, **outcome})
    launched = {f"{launch.module}.{launch.kernel}" for launch in launches}
    per_kernel = {name: {**info, "specializations": sum(1 for s in specs.values() if f"{s.module}.{s.kernel}" == name)}
                  for name, info in found.items()}
    problems = [f"{name}: launched in kernels/ but no launcher case records it (add one to launcher_calls)"
                for name, info in found.items() if info["launched"] and name not in launched]
    problems += [f"{name}: named like a kernel but never launched with kernel[grid](...)"
                 for name, info in found.items() if name.endswith("_kernel") and not info["launched"]]
    problems += [f"launcher {n} is never called by launcher_calls" for n in kernels.__all__
                 if inspect.isfunction(getattr(kernels, n)) and n not in called]
    problems += [f"grid beyond CUDA's limits: {p}" for p in grid_problems(launches)]
    for row in rows:
        where = f"{row['kernel']} ({row['label']}) on {row['arch']}"
        if "error" in row:
            problems.append(f"{where} does not compile: {row['error'].splitlines()[0]}")
        elif row["spill_stores"] or row["spill_loads"]:
            problems.append(f"{where} spills {row['spill_stores']} bytes (stores), {row['spill_loads']} (loads)")
    return {
        "triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "ptxas": _ptxas_versions(), "archs": [f"sm_{cc}" for cc in archs], "jobs": jobs,
        "launches": len(launches), "specializations": len(specs), "compiles": len(rows),
        "record_seconds": round(recorded, 2), "seconds": round(time.perf_counter() - start, 2),
        "kernels": per_kernel, "problems": problems, "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# 3. Report


def _mode(label: str) -> tuple[str, str, str]:
    """``(kernel, storage, mode)`` from a row label ``"<kernel> <geometry> <storage> <mode...>"``."""
    parts = label.split(" ", 3)
    return parts[0], f"{parts[1]} {parts[2]}", parts[3] if len(parts) > 3 else ""


def markdown(result: dict[str, Any]) -> str:
    """One row per kernel and mode, one column per storage; a cell is registers per thread per arch
    (spilled bytes marked)."""
    archs = result["archs"]
    cells: dict[tuple[str, str], dict[str, dict[str, tuple[int, str]]]] = {}
    storages: list[str] = []
    for row in result["rows"]:
        kernel, storage, mode = _mode(row["label"])
        if storage not in storages:
            storages.append(storage)
        # Several specializations may share a label (the residual's two offsets): the worst one shows.
        slot = cells.setdefault((kernel, mode), {}).setdefault(storage, {})
        if "error" in row:
            slot[row["arch"]] = (10**6, "error")
            continue
        spill = row["spill_stores"] + row["spill_loads"]
        text = f"{row['registers']}" + (f" (spills {row['spill_stores']}+{row['spill_loads']} B)" if spill else "")
        worst = (row["registers"] + 10**5 * bool(spill), text)
        slot[row["arch"]] = max(slot.get(row["arch"], worst), worst)
    lines = [
        f"Triton {result['triton']} (ptxas: {', '.join(f'{k} {v}' for k, v in result['ptxas'].items())}); "
        f"{result['specializations']} specializations x {len(archs)} targets in {result['seconds']:.0f} s "
        f"({result['jobs']} processes). Registers per thread, {' / '.join(archs)}:",
        "",
        "| kernel | mode | " + " | ".join(storages) + " |",
        "|---|---|" + "---:|" * len(storages),
    ]
    for (kernel, mode), by in cells.items():
        row = [" / ".join(by[s][a][1] if a in by[s] else "–" for a in archs) if s in by else "" for s in storages]
        lines.append(f"| {kernel} | {mode or '–'} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- {p}" for p in result["problems"]] or ["No spills, every specialization compiled, every grid "
                                                       "within CUDA's limits, every kernel covered."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    # Real JIT functions, not the interpreter's; a fresh cache so that ptxas runs (and logs) for each.
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.TemporaryDirectory(prefix="revgrad-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the default
    with cache:
        result = run(tuple(args.arch), max(1, args.jobs))
    table = markdown(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
