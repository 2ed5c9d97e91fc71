"""Small-scale reproduction of Behrmann et al. 2021 ("exploding inverses") on scikit-learn digits.

Trains four Glow-style INN classifiers (:func:`revgrad.models.glow_classifier`) with the same seed,
the same initial weights per coupling type and the same batch order:

- ``additive``: additive couplings, memory saving with ``check="off"``;
- ``affine-off``: affine couplings (``--scale``, sigmoid by default), classic memory saving (``check="off"``);
- ``affine-correct``: the same with revgrad's guard (``check="correct"``);
- ``affine-off-fd``: ``check="off"`` plus the bidirectional finite-difference penalty every ``--fd-every`` steps.

Every ``--measure-every`` steps it records, on the current training batch: the relative reconstruction
error of the flow (max over the batch of ``||F^-1(F(x)) - x|| / ||x||``), the angle and relative L2
distance between the memory-saving gradient of the cross-entropy and the true gradient (a plain-autograd
twin with the same weights, all parameter gradients flattened), the test accuracy, and, for the guarded
run, the corrections revgrad made (summed over all training steps so far).

Writes ``<out>/<run>.json``, ``<out>/paper.png`` and ``<out>/summary.json``; prints a markdown table.

    python bench/paper/reproduce.py --quick
    python bench/paper/reproduce.py --quick --lr 1e-2 --depth 8 --runs affine-off affine-correct  # stronger
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from revgrad.analysis.regularizers import PenaltySchedule
from revgrad.models import glow_classifier
from revgrad.tools.demo import load_digits_data

RUNS = ("additive", "affine-off", "affine-correct", "affine-off-fd")


def _config(run: str) -> dict:
    if run == "additive":
        return {"coupling": "additive", "check": "off", "fd": False}
    if run == "affine-off":
        return {"coupling": "affine", "check": "off", "fd": False}
    if run == "affine-correct":
        return {"coupling": "affine", "check": "correct", "fd": False}
    if run == "affine-off-fd":
        return {"coupling": "affine", "check": "off", "fd": True}
    raise ValueError(run)


def _build(args, coupling: str, memory_saving: bool, check: str):
    return glow_classifier(
        in_channels=1, num_classes=10, levels=args.levels, depth=args.depth, hidden=args.hidden,
        coupling=coupling, permutation=args.permutation, scale=args.scale,
        memory_saving=memory_saving, check=check,
    )


def _z(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def recon_error(model, x: torch.Tensor) -> float:
    """Max over the batch of the relative reconstruction error of the flow."""
    z = _z(model.flow(x))
    xr = model.flow.inverse(z)
    num = (xr - x).flatten(1).norm(dim=1)
    den = x.flatten(1).norm(dim=1).clamp_min(1e-12)
    err = num / den
    if not torch.isfinite(err).all():
        return math.inf
    return float(err.max())


def _grads(model) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        parts.append(g.detach().flatten().double())
    return torch.cat(parts)


def grad_compare(model, twin, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, bool, bool]:
    """(angle in degrees, relative L2 distance, memory-saving grad finite, true grad finite) of the CE gradients."""
    twin.load_state_dict(model.state_dict())
    twin.train()
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
    g_ms, g_true = _grads(model), _grads(twin)
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    ms_ok, true_ok = bool(torch.isfinite(g_ms).all()), bool(torch.isfinite(g_true).all())
    if not (ms_ok and true_ok):
        return math.nan, math.nan, ms_ok, true_ok
    nt = g_true.norm()
    cos = float(g_ms @ g_true / (g_ms.norm() * nt).clamp_min(1e-300))
    angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    rel = float((g_ms - g_true).norm() / nt.clamp_min(1e-300))
    return angle, rel, True, True


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    logits = model(x)
    model.train()
    if not torch.isfinite(logits).all():
        return math.nan
    return float((logits.argmax(1) == y).float().mean())


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` minibatches of sample indices: epochs of a seeded permutation of ``n``, full batches only."""
    g = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n, generator=g)
        order += [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return order[:steps]


def train_run(run: str, args, data, order: list[torch.Tensor]) -> dict:
    cfg = _config(run)
    torch.manual_seed(args.seed)  # same initial weights for runs with the same coupling
    model = _build(args, cfg["coupling"], True, cfg["check"])
    twin = _build(args, cfg["coupling"], False, "off")
    # ActNorm's data-dependent init: one forward on the first batch, identical for every run.
    with torch.no_grad():
        model(data.x_train[order[0]])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    fd = None
    if cfg["fd"]:
        gen = torch.Generator().manual_seed(args.seed + 1)
        fd = PenaltySchedule(every=args.fd_every, weight=args.fd_weight, eps=args.fd_eps, generator=gen)
    keys = ("step", "recon", "angle", "rel_l2", "test_acc", "corrections", "loss", "ms_grad_finite", "true_grad_finite")
    hist: dict[str, list] = {k: [] for k in keys}
    corrections = 0
    diverged_at, diverged_reason = None, None
    t0 = time.perf_counter()
    loss_val = math.nan
    for step, idx in enumerate(order):
        x, y = data.x_train[idx], data.y_train[idx]
        if step % args.measure_every == 0 or step == len(order) - 1:
            angle, rel, ms_ok, true_ok = grad_compare(model, twin, x, y)
            hist["ms_grad_finite"].append(ms_ok)
            hist["true_grad_finite"].append(true_ok)
            hist["step"].append(step)
            hist["recon"].append(recon_error(model, x))
            hist["angle"].append(angle)
            hist["rel_l2"].append(rel)
            hist["test_acc"].append(accuracy(model, data.x_test, data.y_test))
            hist["corrections"].append(corrections)
            hist["loss"].append(loss_val)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            diverged_at, diverged_reason = step, "cross-entropy"
            break
        if fd is not None:
            loss = loss + fd(step, model.flow, x)
            if not math.isfinite(float(loss.detach())):
                diverged_at, diverged_reason = step, "fd-penalty"
                break
        loss.backward()
        rep = model.flow.last_report
        if rep is not None:
            corrections += len(rep.corrected)
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
    return {
        "run": run, "config": cfg, "history": hist, "diverged_at": diverged_at, "diverged_reason": diverged_reason,
        "seconds": time.perf_counter() - t0,
        "final": {k: hist[k][-1] for k in ("recon", "angle", "rel_l2", "test_acc", "corrections")},
        "max_recon": max(hist["recon"]),
        "max_angle": max((a for a in hist["angle"] if not math.isnan(a)), default=math.nan),
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("recon", "recon error (rel, max over batch)", True), ("angle", "gradient angle (deg)", True),
              ("rel_l2", "gradient rel. L2 distance", True), ("test_acc", "test accuracy", False)]
    for ax, (key, label, log) in zip(axes, panels):
        for r in results:
            h = r["history"]
            vals = [v if (v is not None and math.isfinite(v)) else float("nan") for v in h[key]]
            if log:
                vals = [max(v, 1e-12) if not math.isnan(v) else v for v in vals]
            ax.plot(h["step"], vals, label=r["run"], marker=".")
        ax.set_xlabel("step")
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _div(r: dict) -> str:
    return "-" if r["diverged_at"] is None else f"{r['diverged_at']} ({r['diverged_reason']})"


def table(results: list[dict]) -> str:
    lines = ["| run | final recon err | max recon err | final angle (deg) | max angle (deg) | final rel L2 "
             "| test acc | corrections | diverged at | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["final"]
        lines.append(
            f"| {r['run']} | {f['recon']:.2e} | {r['max_recon']:.2e} | {f['angle']:.3g} | {r['max_angle']:.3g} "
            f"| {f['rel_l2']:.2e} | {f['test_acc']:.3f} | {f['corrections']} "
            f"| {_div(r)} | {r['seconds']:.1f} |"
        )
    lines.append("")
    lines.append("'final' = last measurement (before divergence for diverged runs; training stops at the first "
                 "non-finite loss).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (about 2-3 minutes on 2 CPU cores)")
    p.add_argument("--out", default="bench/out/paper/")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300 quick, 1500 full)")
    p.add_argument("--measure-every", type=int, default=None, help="default 20 quick, 50 full")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--scale", default="sigmoid", choices=("sigmoid", "exp", "bounded"))
    p.add_argument("--permutation", default="shuffle", choices=("shuffle", "conv", "lu", "reverse"))
    p.add_argument("--fd-every", type=int, default=10)
    p.add_argument("--fd-weight", type=float, default=1e-3)
    p.add_argument("--fd-eps", type=float, default=0.1)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 300 if args.quick else 1500
    if args.measure_every is None:
        args.measure_every = 20 if args.quick else 50
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits_data()
    if args.dtype == "float64":
        data = type(data)(**{k: (v.double() if v.is_floating_point() else v) for k, v in vars(data).items()})
    order = batch_order(data.x_train.shape[0], args.batch_size, args.steps, args.seed)

    results = []
    t0 = time.perf_counter()
    for run in args.runs:
        r = train_run(run, args, data, order)
        r["settings"] = vars(args)
        (out / f"{run}.json").write_text(json.dumps(r, indent=1, default=str))
        f = r["final"]
        print(f"{run}: acc {f['test_acc']:.3f} recon {f['recon']:.2e} angle {f['angle']:.3g} "
              f"({r['seconds']:.1f}s)", flush=True)
        results.append(r)
    title = (f"glow_classifier digits: levels={args.levels} depth={args.depth} scale={args.scale} "
             f"lr={args.lr} steps={args.steps} {args.dtype}")
    plot(results, out / "paper.png", title)
    md = table(results)
    (out / "summary.json").write_text(json.dumps(
        {"settings": vars(args), "table": md, "total_seconds": time.perf_counter() - t0}, indent=1, default=str))
    print()
    print(title)
    print(md)
    print(f"\ntotal {time.perf_counter() - t0:.1f}s; outputs in {out}")


if __name__ == "__main__":
    main()
