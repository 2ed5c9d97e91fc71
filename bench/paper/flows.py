"""Small-scale reproduction of the flow experiments of Behrmann et al. 2021 ("exploding inverses").

Trains Glow density models (:func:`revgrad.models.glow`, learned priors) by maximum likelihood on
scikit-learn's 8x8 digits (17 integer levels, uniformly dequantized with fresh noise every batch and
centred to ``[-0.5, 0.5)`` as in ``revgrad demo --task flow``; the test set with fixed noise). Same
seed, same initial weights per coupling type and the same batches and noise for every run:

- ``additive``: additive couplings, memory saving with ``check="off"``;
- ``affine-off``: affine couplings (sigmoid scale), classic memory saving (``check="off"``);
- ``affine-correct``: the same with revgrad's guard (``check="correct"``);
- ``affine-off-fd``: ``check="off"`` plus the bidirectional finite-difference penalty on the whole
  flow ``x -> [z_0, ..., z_top]`` (every ``--fd-every`` steps).

Every ``--measure-every`` steps: test bits/dim; the relative reconstruction error
``||decode(encode(x)) - x|| / ||x||`` (max and median over the samples) on the test images and on the
out-of-distribution probes of :func:`revgrad.ood_probes` built from them (Gaussian and Rademacher
noise at the data's std, the test images times 2 and times 10); and, on the current training batch,
the relative L2 distance and angle between the memory-saving gradient of the bits/dim and the true
one (a ``memory_saving=False`` twin loaded with the same ``state_dict``, all parameter gradients
flattened). Training stops at the first non-finite loss.

Writes ``<out>/<run>.json`` and ``<out>/summary.json``, the PNG (``--png``), prints markdown tables.

    python bench/paper/flows.py --quick --png bench/paper/flows_quick.png
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from reproduce import batch_order  # the classifier experiment's minibatch order (a sibling script)
from torch import nn

from revgrad import ood_probes
from revgrad.analysis.regularizers import PenaltySchedule
from revgrad.models import dequantize, glow
from revgrad.tools.demo import FLOW_BINS, FLOW_TEST_NOISE_SEED, load_digits_levels

RUNS = ("additive", "affine-off", "affine-correct", "affine-off-fd")
PROBES = ("gaussian", "rademacher", "scaled_2x", "scaled_10x")
SETS = ("test", *PROBES)


def _config(run: str) -> dict:
    return {
        "additive": {"coupling": "additive", "check": "off", "fd": False},
        "affine-off": {"coupling": "affine", "check": "off", "fd": False},
        "affine-correct": {"coupling": "affine", "check": "correct", "fd": False},
        "affine-off-fd": {"coupling": "affine", "check": "off", "fd": True},
    }[run]


def _build(args, coupling: str, memory_saving: bool, check: str):
    return glow(
        in_channels=1, image_size=8, levels=args.levels, depth=args.depth, hidden=args.hidden,
        coupling=coupling, scale=args.scale, prior="learned", memory_saving=memory_saving, check=check,
    )


def flow_input(levels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integer levels to ``[-0.5, 0.5)``: uniform dequantization (17 bins), then centred (as the demo)."""
    return dequantize(levels, FLOW_BINS, generator=generator) - 0.5


class FlowMap(nn.Module):
    """The Glow as a map ``x -> cat(flattened latents)`` with ``inverse``, for the finite-difference penalty."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten(1) for z in self.model.encode(x)], dim=1)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        latents, i = [], 0
        for shape in self.model.latent_shapes:
            n = math.prod(shape)
            latents.append(z[:, i : i + n].reshape(z.shape[0], *shape))
            i += n
        return self.model.decode(latents)


@torch.no_grad()
def recon_errors(model, x: torch.Tensor) -> tuple[float, float]:
    """(max, median) over the samples of ``||decode(encode(x)) - x|| / ||x||``; inf when non-finite."""
    xr = model.decode(model.encode(x))
    err = (xr - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    return float(err.max()), float(err.median())


@torch.no_grad()
def test_bpd(model, x: torch.Tensor) -> float:
    return float(model.bits_per_dim(x, bins=FLOW_BINS))


def _grads(model) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        parts.append(g.detach().flatten().double())
    return torch.cat(parts)


def grad_compare(model, twin, x: torch.Tensor) -> tuple[float, float, bool, bool]:
    """(relative L2 distance, angle in degrees, memory-saving grad finite, true grad finite) of the
    bits/dim gradients of ``model`` and of its plain-autograd ``twin`` loaded with the same weights."""
    twin.load_state_dict(model.state_dict())
    twin.train()
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        m.bits_per_dim(x, bins=FLOW_BINS).backward()
    g_ms, g_true = _grads(model), _grads(twin)
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    ms_ok, true_ok = bool(torch.isfinite(g_ms).all()), bool(torch.isfinite(g_true).all())
    if not (ms_ok and true_ok):
        return math.nan, math.nan, ms_ok, true_ok
    nt = g_true.norm().clamp_min(1e-300)
    rel = float((g_ms - g_true).norm() / nt)
    cos = float(g_ms @ g_true / (g_ms.norm() * nt).clamp_min(1e-300))
    return rel, math.degrees(math.acos(max(-1.0, min(1.0, cos)))), True, True


def _corrections(model) -> int:
    return sum(len(ch.last_report.corrected) for ch in model.levels if getattr(ch, "last_report", None) is not None)


def train_run(run: str, args, x_train_levels: torch.Tensor, x_test: torch.Tensor,
              probes: dict[str, torch.Tensor], order: list[torch.Tensor]) -> dict:
    cfg = _config(run)
    torch.manual_seed(args.seed)  # same initial weights for runs with the same coupling
    model = _build(args, cfg["coupling"], True, cfg["check"])
    twin = _build(args, cfg["coupling"], False, "off")
    noise = torch.Generator().manual_seed(args.seed + 2)  # the same dequantization noise for every run
    batches = [flow_input(x_train_levels[idx], noise) for idx in order]
    model.train()
    with torch.no_grad():  # ActNorm's data-dependent initialization: the first batch, identical for every run
        model.log_prob(batches[0])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    fd, fmap = None, FlowMap(model)
    if cfg["fd"]:
        gen = torch.Generator().manual_seed(args.seed + 1)
        fd = PenaltySchedule(every=args.fd_every, weight=args.fd_weight, eps=args.fd_eps, generator=gen)
    hist: dict[str, list] = {k: [] for k in ("step", "train_bpd", "test_bpd", "rel_l2", "angle", "corrections",
                                              "ms_grad_finite", "true_grad_finite")}
    for s in SETS:
        hist[f"recon_{s}"], hist[f"recon_median_{s}"] = [], []
    corrections, loss_val = 0, math.nan
    diverged_at, diverged_reason = None, None
    t0 = time.perf_counter()
    for step, x in enumerate(batches):
        if step % args.measure_every == 0 or step == len(batches) - 1:
            rel, angle, ms_ok, true_ok = grad_compare(model, twin, x)
            model.eval()
            hist["step"].append(step)
            hist["train_bpd"].append(loss_val)
            hist["test_bpd"].append(test_bpd(model, x_test))
            for s in SETS:
                mx, med = recon_errors(model, x_test if s == "test" else probes[s])
                hist[f"recon_{s}"].append(mx)
                hist[f"recon_median_{s}"].append(med)
            model.train()
            hist["rel_l2"].append(rel)
            hist["angle"].append(angle)
            hist["ms_grad_finite"].append(ms_ok)
            hist["true_grad_finite"].append(true_ok)
            hist["corrections"].append(corrections)
        opt.zero_grad(set_to_none=True)
        loss = model.bits_per_dim(x, bins=FLOW_BINS)
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            diverged_at, diverged_reason = step, "bits/dim"
            break
        if fd is not None:
            loss = loss + fd(step, fmap, x)
            if not math.isfinite(float(loss.detach())):
                diverged_at, diverged_reason = step, "fd-penalty"
                break
        loss.backward()
        corrections += _corrections(model)
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
    finite_rel = [v for v in hist["rel_l2"] if not math.isnan(v)]
    return {
        "run": run, "config": cfg, "history": hist, "diverged_at": diverged_at, "diverged_reason": diverged_reason,
        "seconds": time.perf_counter() - t0,
        "final": {k: hist[k][-1] for k in hist},
        "max": {**{f"recon_{s}": max(hist[f"recon_{s}"]) for s in SETS},
                "rel_l2": max(finite_rel, default=math.nan)},
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    panels = [(f"recon_{s}", f"recon error, {s} (max over samples)", True) for s in SETS]
    panels += [("rel_l2", "grad rel. L2 distance vs plain autograd", True),
               ("angle", "grad angle vs plain autograd (deg)", True),
               ("test_bpd", "test bits/dim", False)]
    for ax, (key, label, log) in zip(axes.flat, panels):
        for r in results:
            h = r["history"]
            vals = [v if (v is not None and math.isfinite(v)) else float("nan") for v in h[key]]
            if log:
                vals = [max(v, 1e-12) if not math.isnan(v) else v for v in vals]
            ax.plot(h["step"], vals, label=r["run"], marker=".")
            bad = [st for st, v in zip(h["step"], h[key]) if v is not None and math.isinf(v)]
            if bad and log:
                ax.plot(bad, [1e3] * len(bad), "x", color=ax.lines[-1].get_color())
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title + "\nrecon: ||decode(encode(x)) - x|| / ||x||, probes: revgrad.ood_probes(test images); "
                 "x at 1e3: reconstruction not finite")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _div(r: dict) -> str:
    return "-" if r["diverged_at"] is None else f"{r['diverged_at']} ({r['diverged_reason']})"


def _e(v: float) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:.2e}"


def tables(results: list[dict]) -> str:
    head = "| run | test bpd | " + " | ".join(f"recon {s}" for s in SETS)
    lines = [head + " | max recon scaled_10x | grad rel L2 | max grad rel L2 | corrections | diverged at | time (s) |",
             "|---|" + "---|" * (len(SETS) + 7)]
    for r in results:
        f, m = r["final"], r["max"]
        lines.append(
            f"| {r['run']} | {f['test_bpd']:.3f} | " + " | ".join(_e(f[f'recon_{s}']) for s in SETS)
            + f" | {_e(m['recon_scaled_10x'])} | {_e(f['rel_l2'])} | {_e(m['rel_l2'])} | {f['corrections']}"
            f" | {_div(r)} | {r['seconds']:.1f} |"
        )
    lines.append("")
    lines.append("recon = max over the 360 test images (or their probe) of ||decode(encode(x)) - x|| / ||x||, at the "
                 "last measurement; grad rel L2 = ||g_ms - g_plain|| / ||g_plain|| on the training batch.")
    for key, name in (("recon_test", "recon error on test images"), ("recon_scaled_10x", "recon error on test x 10"),
                      ("recon_gaussian", "recon error on Gaussian probe"), ("rel_l2", "grad rel L2"),
                      ("test_bpd", "test bits/dim")):
        lines += ["", f"Over training: {name}", "",
                  "| step | " + " | ".join(r["run"] for r in results) + " |",
                  "|---|" + "---|" * len(results)]
        steps = sorted({s for r in results for s in r["history"]["step"]})
        for st in steps:
            cells = []
            for r in results:
                h = r["history"]
                v = h[key][h["step"].index(st)] if st in h["step"] else None
                cells.append("" if v is None else (f"{v:.3f}" if key == "test_bpd" else _e(v)))
            lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=False,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + (" (uncommitted changes)" if dirty else "") or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300 steps, measured every 50 (about 3-4 minutes)")
    p.add_argument("--out", default="bench/out/paper-flows/")
    p.add_argument("--png", default=None, help="PNG path (default <out>/flows.png)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300 quick, 1500 full)")
    p.add_argument("--measure-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--scale", default="sigmoid", choices=("sigmoid", "exp"))
    p.add_argument("--fd-every", type=int, default=10)
    p.add_argument("--fd-weight", type=float, default=1e-3)
    p.add_argument("--fd-eps", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 300 if args.quick else 1500
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = Path(args.png) if args.png else out / "flows.png"

    data = load_digits_levels()
    x_test = flow_input(data.x_test, torch.Generator().manual_seed(FLOW_TEST_NOISE_SEED))
    probes = ood_probes(x_test, seed=args.seed)
    order = batch_order(data.x_train.shape[0], args.batch_size, args.steps, args.seed)

    results = []
    t0 = time.perf_counter()
    for run in args.runs:
        r = train_run(run, args, data.x_train, x_test, probes, order)
        r["settings"] = vars(args)
        (out / f"{run}.json").write_text(json.dumps(r, indent=1, default=str))
        f = r["final"]
        print(f"{run}: test bpd {f['test_bpd']:.3f} recon test {f['recon_test']:.2e} x10 {f['recon_scaled_10x']:.2e} "
              f"grad rel {f['rel_l2']:.2e} ({r['seconds']:.1f}s)", flush=True)
        results.append(r)
    title = (f"glow density model, digits 8x8 (17 levels, dequantized): levels={args.levels} depth={args.depth} "
             f"hidden={args.hidden} scale={args.scale} lr={args.lr} steps={args.steps}")
    plot(results, png, title)
    md = tables(results)
    total = time.perf_counter() - t0
    header = (f"command: `python {' '.join(['bench/paper/flows.py', *(argv if argv is not None else sys.argv[1:])])}`"
              f"  \ntorch {torch.__version__}, commit {_commit()}, {torch.get_num_threads()} thread(s), "
              f"total {total:.1f}s")
    (out / "summary.json").write_text(json.dumps(
        {"settings": vars(args), "header": header, "table": md, "total_seconds": total}, indent=1, default=str))
    print()
    print(title)
    print(header)
    print()
    print(md)
    print(f"\noutputs in {out}, plot {png}")


if __name__ == "__main__":
    main()
