"""``revgrad bench``: memory and step time of every provider on the RevNet stage (or a transformer), over depth.

For every depth, every provider trains the same workload (same initial weights): the RevNet stage
(:func:`revgrad.tools.benchmark.revnet_stage`, ``workload="revnet-stage"``), the layers of a reversible
causal language model (:func:`revgrad.tools.benchmark.transformer_stack`, ``"transformer"``) or a RevViT
(:func:`revgrad.tools.benchmark.rev_vit_model`, ``"vit"``); the bytes held between forward and backward
and the peak of the step (:func:`revgrad.tools.measure.step_memory`), then the step time, providers
interleaved round by round (:func:`revgrad.tools.measure.time_interleaved`), with ratios to plain
autograd measured in the same run.
A float64 check first makes sure every provider computes plain autograd's gradients. Optionally, the
largest batch whose step fits a byte budget (:func:`revgrad.tools.measure.largest_batch`).

The result (:func:`run_bench`) is a JSON-ready dict; :func:`format_table` prints it,
:func:`write_outputs` writes ``bench.json`` and ``bench.png`` (memory and time vs depth; needs
matplotlib).
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .benchmark import (
    ALL_PROVIDERS,
    PROVIDERS,
    TrainStep,
    Workload,
    available_providers,
    compare_with_plain,
    rev_vit_model,
    revnet_stage,
    transformer_stack,
)
from .measure import (
    available_cores,
    is_out_of_memory,
    largest_batch,
    load_average,
    machine_info,
    pin_malloc,
    step_memory,
    time_interleaved,
)

__all__ = [
    "FULL",
    "PRESETS",
    "QUICK",
    "WORKLOADS",
    "BenchSettings",
    "bench_session",
    "format_table",
    "largest_batches",
    "measure_providers",
    "plot",
    "resolve_device",
    "run_bench",
    "workload_info",
    "write_outputs",
]

SCHEMA = "revgrad.bench/1"
MIB = 2**20
WORKLOADS: tuple[str, ...] = ("revnet-stage", "transformer", "vit")


@dataclass(frozen=True)
class BenchSettings:
    """What ``revgrad bench`` measures.

    Attributes:
        workload: ``"revnet-stage"`` (the RevNet stage), ``"transformer"`` (rev_lm's layers on
            ``[batch, tokens, 2 * dim]``) or ``"vit"`` (RevViT on ``[batch, 3, size, size]``).
        depths: blocks (layers) of the workload, one measurement each.
        batch, channels, size: the stage input ``[batch, channels, size, size]`` (fp32); ``size`` is
            also RevViT's image size.
        dim, heads, tokens, patch: the transformers' features per stream, attention heads, sequence
            length (``"transformer"``) and patch size (``"vit"``, ``(size / patch) ** 2`` tokens).
        steps: timed steps per provider and depth (one per round; the table gives the median).
        warmup: untimed steps per provider and depth before timing (after the memory step).
        providers: providers to run; ``plain`` is always added (every ratio is to it).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch CPU threads while measuring (None: 1 on CPU, steadier on a machine shared with
            other work, where an OpenMP step waits for every descheduled thread; torch's setting on CUDA).
        check: run the float64 agreement check first.
        budget_mib: when set, also the largest batch whose step (input + peak) fits in this many MiB,
            per provider, at the largest depth not above 32.
        seed: weights and data.
    """

    workload: str = "revnet-stage"
    depths: tuple[int, ...] = (8, 16, 32, 64, 128)
    batch: int = 16
    channels: int = 32
    size: int = 16
    steps: int = 5
    warmup: int = 1
    providers: tuple[str, ...] = PROVIDERS
    device: str = "auto"
    threads: int | None = None
    check: bool = True
    budget_mib: float | None = None
    seed: int = 0
    dim: int = 256
    heads: int = 4
    tokens: int = 256
    patch: int = 16

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for impossible settings."""
        if self.workload not in WORKLOADS:
            raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"--depths must be positive integers, got {list(self.depths)}")
        for name in ("batch", "channels", "size", "steps", "dim", "heads", "tokens", "patch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.channels % 2:
            raise ValueError(f"--channels must be even (the couplings split them in halves), got {self.channels}")
        if self.workload != "revnet-stage" and self.dim % self.heads:
            raise ValueError(f"--dim must be divisible by --heads, got {self.dim} and {self.heads}")
        if self.workload == "vit" and self.size % self.patch:
            raise ValueError(f"--size must be divisible by --patch for the vit workload, got {self.size} and "
                             f"{self.patch}")
        unknown = [p for p in self.providers if p not in ALL_PROVIDERS]
        if unknown:
            raise ValueError(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(ALL_PROVIDERS)}")
        if self.budget_mib is not None and not self.budget_mib > 0:
            raise ValueError(f"--budget-mib must be positive, got {self.budget_mib}")

    @property
    def budget_depth(self) -> int:
        """The depth of the largest-batch search: the largest of ``depths`` not above 32 (else the smallest)."""
        return max((d for d in self.depths if d <= 32), default=min(self.depths))


FULL = BenchSettings()
QUICK = BenchSettings(depths=(8, 16, 32), batch=8, steps=3)
# Per workload, (full, --quick). The transformers also offer reformer_pytorch and revtorch.
PRESETS: dict[str, tuple[BenchSettings, BenchSettings]] = {
    "revnet-stage": (FULL, QUICK),
    # rev_lm's default width: d 256 per stream, 4 heads, 256 tokens.
    "transformer": (
        BenchSettings(workload="transformer", depths=(4, 8, 16, 32), batch=8, steps=3, providers=ALL_PROVIDERS),
        BenchSettings(workload="transformer", depths=(2, 4, 8), batch=4, dim=64, heads=4, tokens=64, steps=3,
                      providers=ALL_PROVIDERS),
    ),
    # RevViT-S/16 at 224 px (dim 768, heads 12: RevViT-B/16).
    "vit": (
        BenchSettings(workload="vit", depths=(4, 8, 12), batch=8, size=224, patch=16, dim=384, heads=6, steps=3,
                      providers=ALL_PROVIDERS),
        BenchSettings(workload="vit", depths=(2, 4, 8), batch=4, size=64, patch=8, dim=96, heads=3, steps=3,
                      providers=ALL_PROVIDERS),
    ),
}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; raises ``ValueError`` for an unusable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: revgrad bench runs on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _stage(settings: BenchSettings, depth: int, batch: int | None = None) -> Workload:
    """The workload of ``settings`` at ``depth`` blocks (and ``batch``, default the settings')."""
    s, batch = settings, batch or settings.batch
    if s.workload == "transformer":
        return transformer_stack(depth=depth, dim=s.dim, tokens=s.tokens, heads=s.heads, batch=batch, seed=s.seed)
    if s.workload == "vit":
        return rev_vit_model(depth=depth, dim=s.dim, heads=s.heads, size=s.size, patch=s.patch, batch=batch,
                             seed=s.seed)
    return revnet_stage(blocks=depth, batch=batch, channels=s.channels, size=s.size, seed=s.seed)


def _exact(settings: BenchSettings) -> Workload:
    """A small copy of the workload for the float64 check: the same kind of blocks and at most 8 of them
    (4 transformer layers), batch 2, and small images, sequences and widths (float64 is slow on CPU;
    agreement tests the algorithm, not the sizes)."""
    s, depth = settings, min(settings.depths)
    if s.workload == "transformer":
        return transformer_stack(depth=min(depth, 4), dim=s.heads * min(s.dim // s.heads, 8), tokens=min(s.tokens, 16),
                                 heads=s.heads, batch=2, seed=s.seed)
    if s.workload == "vit":
        return rev_vit_model(depth=min(depth, 4), dim=s.heads * min(s.dim // s.heads, 8), heads=s.heads,
                             size=min(s.size, 2 * s.patch), patch=s.patch, batch=2, num_classes=10, seed=s.seed)
    return revnet_stage(blocks=min(depth, 8), batch=2, channels=s.channels, size=min(s.size, 8), seed=s.seed)


def _providers(settings: BenchSettings, notes: list[str]) -> list[str]:
    """The providers to run (plain first), noting each one skipped and why."""
    requested = ["plain", *(p for p in settings.providers if p != "plain")]
    chosen, skipped = available_providers(_stage(settings, 1), requested)
    notes += skipped
    return chosen


def _check(settings: BenchSettings, providers: list[str], notes: list[str],
           device: torch.device) -> dict[str, dict[str, Any]]:
    """float64 agreement of every provider with plain autograd on a small copy of the stage, on the
    device measured (on CUDA: the engine's CUDA path)."""
    out = {}
    for p, a in compare_with_plain(_exact(settings), providers, fp32=False, device=device).items():
        out[p] = {"agrees": a.ok, "max_fp64_error": a.max_fp64_error, "summary": a.summary()}
        if not a.ok:
            notes.append(f"{p}: DISAGREES with plain autograd in float64 ({a.summary()}); its numbers are not "
                         "comparable")
    return out


def _bytes_per_depth(stats: dict[int, dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of ``key`` over depth (bytes per block), None with fewer than two depths."""
    points = [(d, r[key]) for d, r in stats.items() if r.get(key) is not None]
    if len(points) < 2:
        return None
    return statistics.linear_regression([d for d, _ in points], [v for _, v in points]).slope


@contextmanager
def bench_session(device: torch.device, threads: int | None) -> Iterator[bool]:
    """Measuring conditions for a run; yields whether glibc's malloc thresholds were pinned.

    torch CPU threads set to ``threads`` (None: 1 on CPU, torch's setting on CUDA) and restored after;
    glibc's malloc thresholds pinned on CPU (:func:`revgrad.tools.measure.pin_malloc`, warm pages for every
    provider); memcnn's deprecation warning for the ``TypedStorage`` API it uses once per block and
    step silenced; the objects alive at the start moved out of the garbage collector's sight
    (``gc.freeze``): the measurements collect garbage before every step, and with torch's and
    Triton's modules in sight one collection takes ~0.2 s here.
    """
    before = torch.get_num_threads()
    gc.collect()
    gc.freeze()
    try:
        if threads is not None or device.type == "cpu":
            torch.set_num_threads(threads or 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            yield device.type == "cpu" and pin_malloc()
    finally:
        gc.unfreeze()
        torch.set_num_threads(before)


def measure_providers(workload: Workload, providers: Sequence[str], device: torch.device, rounds: int,
                      warmup: int = 1, on_step: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Memory and step time of every provider on ``workload`` (``plain`` among them for the ratios).

    Memory first, provider by provider (:func:`revgrad.tools.measure.step_memory`), then ``rounds``
    interleaved timed steps (:func:`revgrad.tools.measure.time_interleaved`). Per provider: ``held_bytes``,
    ``peak_bytes``, ``step_ms`` (median), ``step_ms_p25`` / ``step_ms_p75``, ``images_per_s`` (batch /
    median step), ``ratio`` (step time / plain's, paired per round), ``held_ratio`` and ``peak_ratio``
    (bytes / plain's) and ``times_ms``. ``on_step`` is called after every step (memory or timed).
    """
    x = workload.input(device=device)
    steps = {p: TrainStep(workload.build(p, device=device), x, workload.seed) for p in providers}
    memory = {}
    for p, step in steps.items():
        memory[p] = step_memory(step, device)
        if on_step is not None:
            on_step()
    timings = time_interleaved(steps, rounds=rounds, warmup=warmup, device=device, on_step=on_step)
    ref = memory.get("plain")
    rows = {}
    for p in providers:
        m = memory[p]
        rows[p] = {
            "held_bytes": m.held_bytes,
            "peak_bytes": m.peak_bytes,
            "step_ms": timings.median_ms(p),
            "step_ms_p25": timings.quantile_ms(p, 0.25),
            "step_ms_p75": timings.quantile_ms(p, 0.75),
            "images_per_s": workload.batch / (timings.median_ms(p) / 1e3),
            "ratio": timings.ratio(p),
            "held_ratio": m.held_bytes / ref.held_bytes if ref and ref.held_bytes else None,
            "peak_ratio": m.peak_bytes / ref.peak_bytes if ref and m.peak_bytes and ref.peak_bytes else None,
            "times_ms": [t * 1e3 for t in timings.times[p]],
        }
    return rows


def largest_batches(workload: Workload, providers: Sequence[str], budget_bytes: int, device: torch.device,
                    tolerance: float = 1 / 32, on_probe: Callable[[str, int, bool], None] | None = None
                    ) -> dict[str, int]:
    """Per provider, the largest batch whose step fits ``budget_bytes``: input bytes + peak bytes of a
    step on ``workload`` at that batch (:func:`revgrad.tools.measure.largest_batch`, within ``tolerance``).

    On CUDA an out-of-memory error counts as not fitting. On CPU nothing limits the allocation: the
    bytes are counted, so a budget well above the machine's free memory would swap or fail.
    """
    found: dict[str, int] = {}
    for p in providers:
        stage = workload.build(p, device=device)
        warm = [False]  # the first probe warms the module up; later ones reuse its lazily created state

        def fits(batch: int, stage=stage, warm=warm) -> bool:
            w = workload.with_batch(batch)
            x = w.input(device=device)
            try:
                m = step_memory(TrainStep(stage, x, w.seed), device, warmup=not warm[0])
                warm[0] = True
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                return False
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            return m.peak_bytes is not None and x.nbytes + m.peak_bytes <= budget_bytes

        def probed(batch: int, ok: bool, p=p) -> None:
            if on_probe is not None:
                on_probe(p, batch, ok)

        found[p] = largest_batch(fits, tolerance=tolerance, on_probe=probed)
    return found


def workload_info(workload: Workload, device: torch.device) -> dict[str, Any]:
    """What a result measured: the workload, the step and how bytes were counted."""
    return {
        "name": workload.name,
        "description": workload.description,
        "input_shape": list(workload.input_shape),
        "activation_bytes": workload.activation_bytes(),
        "step": "forward, backward with fixed upstream gradients, zero_grad(set_to_none=True)",
        "memory": "glibc mallinfo2 (peak read between ATen operators)" if device.type == "cpu"
        else "torch.cuda.memory_allocated / max_memory_allocated",
    }


class _NoBar:
    """Stands in for ``tqdm`` where it is not installed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


def run_bench(settings: BenchSettings, *, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready result (schema ``revgrad.bench/1``).

    ``results[provider][str(depth)]``: the row of :func:`measure_providers` for the stage of that
    depth. Raises ``ValueError`` for impossible settings or an unusable device.
    """
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU box: run without the progress bar
        tqdm = _NoBar

    settings.validate()
    device = resolve_device(settings.device)
    with bench_session(device, settings.threads) as malloc_pinned:
        notes: list[str] = []
        load = load_average()[:1]
        if device.type == "cpu" and load and load[0] > 0.5 * available_cores():
            notes.append(f"load average {load[0]:.1f} on {available_cores()} cores at the start: other processes "
                         "compete for the CPU, step times are noisy (ratios are paired per round)")
        providers = _providers(settings, notes)
        info = workload_info(_stage(settings, settings.depths[0]), device)
        info |= {"name": info["name"].rsplit("-", 1)[0], "description": "N " + info["description"].split(" ", 1)[1]}
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "machine": machine_info(device, command) | {"malloc_pinned": malloc_pinned},
            "settings": asdict(settings) | {"device": str(device)},
            "workload": info,
            "providers": providers,
            "notes": notes,
            "agreement": _check(settings, providers, notes, device) if settings.check else None,
            "results": {p: {} for p in providers},
            "held_bytes_per_block": {},
            "largest_batch": None,
        }
        total = len(settings.depths) * len(providers) * (1 + settings.warmup + settings.steps)
        with tqdm(total=total, desc="revgrad bench", unit="step", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True, leave=False) as bar:
            for depth in settings.depths:
                bar.set_postfix_str(f"depth {depth}")
                rows = measure_providers(_stage(settings, depth), providers, device, settings.steps,
                                         settings.warmup, on_step=lambda: bar.update(1))
                for p, row in rows.items():
                    result["results"][p][str(depth)] = row
        for p in providers:
            stats = {int(d): r for d, r in result["results"][p].items()}
            result["held_bytes_per_block"][p] = _bytes_per_depth(stats, "held_bytes")

        if settings.budget_mib is not None:
            budget = int(settings.budget_mib * MIB)
            with tqdm(desc="largest batch", unit="probe", disable=not progress, file=sys.stderr, leave=False) as bar:
                found = largest_batches(_stage(settings, settings.budget_depth), providers, budget, device,
                                        on_probe=lambda p, b, ok: (bar.set_postfix_str(f"{p} {b}"), bar.update(1)))
            result["largest_batch"] = {
                "budget_bytes": budget, "depth": settings.budget_depth, "tolerance": 1 / 32, "batch": found,
                "ratio": {p: b / found["plain"] if found.get("plain") else None for p, b in found.items()},
            }
    return result


# --------------------------------------------------------------------------------------------------
# Output.


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The result as text: machine, notes, a markdown table (provider x depth) and the largest batches."""
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"revgrad bench: {result['workload']['description']}, batch {s['batch']}",
        f"device {s['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f" | CPU {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads | torch {m['torch']}"
        + f" | triton {m['triton'] or '-'}",
        f"memory: {result['workload']['memory']}; held = bytes forward leaves for backward, peak = the step's "
        "largest; time: median, providers interleaved, x plain = paired per-round ratio",
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    agreement = result.get("agreement") or {}
    lines += [
        "",
        "| provider | depth | held MiB | peak MiB | step ms | time x plain | held % plain | float64 check |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p, per_depth in result["results"].items():
        a = agreement.get(p)
        verdict = "-" if a is None else ("agrees" if a["agrees"] else "**DISAGREES**")
        for depth, r in per_depth.items():
            held_pct = None if r["held_ratio"] is None else 100 * r["held_ratio"]
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / MIB
            lines.append(
                f"| {p} | {depth} | {r['held_bytes'] / MIB:.2f} | {_fmt(peak, '.2f')} | {r['step_ms']:.1f} | "
                f"{_fmt(r['ratio'], '.2f')} | {_fmt(held_pct, '.1f')} | {verdict} |"
            )
    per_block = result.get("held_bytes_per_block") or {}
    if any(v is not None for v in per_block.values()):
        lines.append("")
        lines.append("held bytes per extra block (slope over depth): " + ", ".join(
            f"{p} {v / 1024:.1f} KiB" for p, v in per_block.items() if v is not None))
    lb = result.get("largest_batch")
    if lb:
        lines.append("")
        lines.append(f"largest batch whose step fits {lb['budget_bytes'] / MIB:g} MiB (input + peak), depth "
                     f"{lb['depth']}, within {lb['tolerance'] * 100:.0f}%: " + ", ".join(
                         f"{p} {b} ({_fmt(lb['ratio'][p], '.1f')}x plain)" for p, b in lb["batch"].items()))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Three panels, one line per provider, over depth: memory held (solid) and step peak (dashed);
    step time; step time relative to plain autograd (paired per round).

    Raises ``ImportError`` without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time, ax_ratio) = plt.subplots(1, 3, figsize=(15, 4.4))
    ticks = sorted({int(d) for per_depth in result["results"].values() for d in per_depth})
    for i, (p, per_depth) in enumerate(result["results"].items()):
        depths = [int(d) for d in per_depth]
        rows = list(per_depth.values())
        color = f"C{i}"
        ax_mem.plot(depths, [r["held_bytes"] / MIB for r in rows], "o-", color=color, label=p)
        if all(r["peak_bytes"] is not None for r in rows):
            ax_mem.plot(depths, [r["peak_bytes"] / MIB for r in rows], "--", color=color, alpha=0.5)
        ax_time.plot(depths, [r["step_ms"] for r in rows], "o-", color=color, label=p)
        ax_ratio.plot(depths, [r["ratio"] for r in rows], "o-", color=color, label=p)
    for ax in (ax_mem, ax_time, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("blocks")
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_yscale("log")
    ax_mem.set_ylabel("MiB (solid: held for backward; dashed: step peak)")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("step time, ms (median)")
    ax_ratio.set_ylabel("step time / plain autograd's (paired per round)")
    ax_mem.legend(fontsize=8)
    m, s = result["machine"], result["settings"]
    where = m["gpu"] or f"{m['cpu']}, {m['threads']} thread{'s' if m['threads'] > 1 else ''}"
    shape = "x".join(map(str, result["workload"]["input_shape"][1:]))
    fig.suptitle(f"revgrad bench: {result['workload']['name']}, batch {s['batch']}, [{shape}] "
                 f"- {where} - torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> tuple[Path, Path | None, str | None]:
    """Write ``out/bench.json`` and ``out/bench.png``: ``(json path, png path or None, why no PNG)``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    png = out / "bench.png"
    try:
        plot(result, png)
    except ImportError:
        return json_path, None, "matplotlib is not installed (pip install matplotlib): no plot written"
    return json_path, png, None
