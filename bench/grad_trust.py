"""Gradient trust over a long run: each step's gradient error of memory-saving backprop vs plain autograd.

The exploding-inverses setting at CPU scale: :func:`revgrad.models.glow_classifier` (2 levels x 4 steps
of ActNorm, invertible 1x1 convolution, affine coupling with sigmoid scale; hidden width 16) on
scikit-learn's 8x8 digits, batch 64, Adam at lr 1e-2, no regularizer. One training trajectory, driven
by ``check="correct"``'s gradients as a user's would be; at every step, each provider's gradient at the
same weights and batch is compared with plain autograd's (relative L2 over all parameter gradients):

- ``off``: classic reversible backprop (no check);
- ``input-only``: ``check="correct"`` with ``probe_every=0`` (rebuilt activations checked against ``tol``);
- ``correct``: the default, gradient-aware (``probe_every=20``, :mod:`revgrad.engine.sensitivity`);
- ``anchors in forward``: the default with ``anchor_every=6`` (regular anchors stored in forward).

Every provider keeps its own state (adaptive anchors, sensitivities) across the run, as a wrapper
built once would. Each step also computes the float64 truth (the same weights and batch in float64)
and every gradient's distance to it, plain autograd's included: where plain float32 is far from the
truth, a rebuild's rounding-size difference may land on the other side of a discontinuity of the
gradient. The step counts as a *kink step* when a ReLU in the model sees an input whose sign differs
between float32 and float64 (a kink crossed by rounding: the float32 gradient is then not determined
to better than the jump it makes). Then the step times, providers interleaved, as paired ratios to
``off``.

    python bench/grad_trust.py --steps 2000 --json bench/out/grad_trust.json
    python bench/grad_trust.py --steps 200 --fresh      # a new wrapper every step (no state kept)
    python bench/grad_trust.py --stage-truth            # RevNet stage: float32 gradients vs float64 truth
    python bench/grad_trust.py --drift                  # deep healthy chains: drift anchors vs none
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import revgrad
from revgrad.models import glow_classifier
from revgrad.tools.demo import load_digits_data
from revgrad.tools.measure import machine_info, time_interleaved

PROVIDERS = {
    "off": {"check": "off"},
    "input-only": {"check": "correct", "probe_every": 0},
    "correct": {"check": "correct"},
    # The 26-block flow's regular anchors (every ceil(sqrt(26)) = 6 blocks) stored in forward.
    "anchors in forward": {"check": "correct", "anchor_every": 6},
}


def build(hidden: int, seed: int):
    torch.manual_seed(seed)
    return glow_classifier(in_channels=1, levels=2, depth=4, hidden=hidden, coupling="affine",
                           permutation="conv", scale="sigmoid", memory_saving=False)


def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for p in model.parameters()])


def gradient(model, flow, x, y) -> tuple[torch.Tensor, object]:
    """The cross-entropy gradient of ``model`` with ``flow`` in place of its flow, and its report."""
    plain = model.flow
    model.flow = flow
    try:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return flat_grads(model), getattr(flow, "last_report", None)
    finally:
        model.flow = plain


def kink_crossed(model, model64, x: torch.Tensor) -> bool:
    """Whether a ReLU of ``model`` sees an input whose sign differs from ``model64``'s (same weights in
    float64) on batch ``x``: float32 rounding crossed a kink of the gradient there."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for m in (model, model64):
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.ReLU):
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, inputs, name=name: seen.setdefault(name, []).append(inputs[0].detach() > 0)))
    try:
        with torch.no_grad():
            model(x)
            model64(x.to(torch.float64))
    finally:
        for h in handles:
            h.remove()
    # Each ReLU's calls in float32, then the same calls in float64 (a module called twice has four).
    return any(bool((a != b).any()) for calls in seen.values()
               for a, b in zip(calls[: len(calls) // 2], calls[len(calls) // 2 :]))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a - b).norm() / b.norm().clamp_min(1e-300))
    return err if math.isfinite(err) else math.inf


def percentiles(values: list[float]) -> dict[str, float]:
    finite = sorted(v if math.isfinite(v) else math.inf for v in values)
    pick = lambda q: finite[min(len(finite) - 1, int(q * len(finite)))]  # noqa: E731
    return {"median": pick(0.5), "p99": pick(0.99), "p99.9": pick(0.999), "max": finite[-1]}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    data = load_digits_data()
    model = build(args.hidden, args.seed)
    with torch.no_grad():  # ActNorm's data-dependent initialisation, once, on the first batch
        model(data.x_train[: args.batch])
    blocks = list(model.flow)

    def wrapper(options):
        return revgrad.ReversibleSequential(*blocks, **options)

    flows = {name: wrapper(options) for name, options in PROVIDERS.items()}
    model64 = build(args.hidden, args.seed).to(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n = data.x_train.shape[0]
    errors: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    vs_truth: dict[str, list[float]] = {name: [] for name in ("plain", *PROVIDERS)}
    kinks: list[bool] = []
    corrections = {name: 0 for name in PROVIDERS}
    probes = 0
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        if args.fresh:
            flows = {name: wrapper(options) for name, options in PROVIDERS.items()}
        truth, _ = gradient(model, model.flow, x, y)
        model64.load_state_dict(model.state_dict())
        truth64, _ = gradient(model64, model64.flow, x.to(torch.float64), y)
        vs_truth["plain"].append(relative(truth, truth64))
        kinks.append(kink_crossed(model, model64, x))
        drive = None
        for name, flow in flows.items():
            g, report = gradient(model, flow, x, y)
            errors[name].append(relative(g, truth))
            vs_truth[name].append(relative(g, truth64))
            corrections[name] += len(report.corrected) if report is not None else 0
            if name == "correct":
                drive = g
                probes += bool(report is not None and report.probed)
        if not math.isfinite(float(drive.norm())):
            print(f"step {step}: the correct gradient is not finite; stopping", file=sys.stderr)
            break
        # Train with check="correct"'s gradient, as a user would.
        offset = 0
        for p in model.parameters():
            p.grad = drive[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        opt.step()
        if args.progress and step % 100 == 0:
            print(f"step {step}: " + ", ".join(f"{k} {v[-1]:.2e}" for k, v in errors.items()), file=sys.stderr)

    summary = {}
    for name, values in vs_truth.items():
        versus_plain = errors.get(name, [0.0] * len(values))
        summary[name] = {
            "steps": len(values),
            "within_target": sum(v <= args.target for v in versus_plain) / len(values),
            "within_target_truth": sum(v <= args.target for v in values) / len(values),
            # Steps off plain by more than the target where no kink was crossed: a rebuild's own error.
            "off_plain_no_kink": [i for i, (v, k) in enumerate(zip(versus_plain, kinks)) if v > args.target and not k],
            "off_truth": [i for i, v in enumerate(values) if v > args.target],
            # As close to the float64 truth as plain autograd, plus the target.
            "as_plain": sum(v <= p + args.target for v, p in zip(values, vs_truth["plain"])) / len(values),
            "corrections": corrections.get(name, 0),
            **percentiles(versus_plain),
            **{f"truth_{k}": v for k, v in percentiles(values).items()},
        }
    timing = time_steps(model, blocks, data, args)
    return {"machine": machine_info(), "args": vars(args), "summary": summary, "probed_steps": probes,
            "kink_steps": [i for i, k in enumerate(kinks) if k], "timing": timing, "errors": errors,
            "errors_vs_truth": vs_truth}


class _Step:
    """One training step of the model with a given flow (for the interleaved timing)."""

    def __init__(self, model, flow, data, batch: int, seed: int) -> None:
        self.model, self.flow, self.data, self.batch = model, flow, data, batch
        self.gen = torch.Generator().manual_seed(seed)

    def prepare(self) -> None:
        idx = torch.randint(0, self.data.x_train.shape[0], (self.batch,), generator=self.gen)
        self.x, self.y = self.data.x_train[idx], self.data.y_train[idx]

    def run(self) -> None:
        gradient(self.model, self.flow, self.x, self.y)


def time_steps(model, blocks, data, args) -> dict:
    steps = {"plain": _Step(model, model.flow, data, args.batch, 7)}
    for name, options in PROVIDERS.items():
        steps[name] = _Step(model, revgrad.ReversibleSequential(*blocks, **options), data, args.batch, 7)
    timings = time_interleaved(steps, rounds=args.rounds, per_round=args.per_round, warmup=3)
    return {name: {"median_ms": timings.median_ms(name), "x_off": timings.ratio(name, "off"),
                   "x_plain": timings.ratio(name, "plain")} for name in steps}


def stage_truth(blocks: int = 12) -> dict[str, float]:
    """One step of the RevNet stage (BatchNorm-ReLU branches): each provider's float32 gradient against
    the float64 truth, beside plain float32 autograd's own distance from it."""
    import copy

    from revgrad.tools.benchmark import revnet_stage, upstream_like

    workload = revnet_stage(blocks=blocks)
    base = workload.build("plain").module.train()
    x = workload.input()
    upstream: list[torch.Tensor] = []

    def grads(model, dtype):
        xx = x.clone().to(dtype).requires_grad_()
        y = model(xx)
        if not upstream:
            upstream.append(upstream_like([y.float()], 0)[0])
        y.backward(upstream[0].to(dtype))
        return torch.cat([xx.grad.flatten(), *(p.grad.flatten() for p in model.parameters())]).double()

    truth = grads(copy.deepcopy(base).double(), torch.float64)
    rows = {"plain float32": relative(grads(copy.deepcopy(base), torch.float32), truth)}
    for name, options in {"off": {"check": "off"}, "input-only": PROVIDERS["input-only"], "correct": {}}.items():
        model = revgrad.reversible(copy.deepcopy(base), **options)
        rows[name] = relative(grads(model, torch.float32), truth)
    return rows


# (couplings, chain seed, input seed): 24 couplings = 32 blocks, 40 = 53, 64 = 85. (40, 0, 0) is
# tests/test_verified.py's drifting chain: rebuilt from the top its inputs reach tol near block 17.
DRIFT_CASES = ((24, 0, 100), (24, 1, 101), (40, 0, 0), (40, 0, 100), (40, 1, 101), (64, 0, 100))


def drift(cases: tuple[tuple[int, int, int], ...] = DRIFT_CASES, steps: int = 10) -> list[dict]:
    """Deep healthy float32 chains (``tests/chains.py``'s ``healthy_chain``: additive and affine
    couplings, flips), rebuilt from the top by default: each provider's gradient (input and parameters)
    after ``steps`` steps at the same weights and input, against the float64 truth, beside plain float32
    autograd's. Providers: rebuilt from the top with no drift anchors, the default (drift anchors), and
    regular anchors stored in forward every ceil(sqrt(N)) blocks. Worst tensor and whole gradient."""
    import copy

    import revgrad.engine.backprop as engine

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from chains import healthy_chain
    from reference import plain_chain, scalar_loss

    def grads(net, x, options=None):
        model = copy.deepcopy(net)
        run = (lambda h: plain_chain(list(model), h)) if options is None else revgrad.reversible(model, **options)
        for _ in range(1 if options is None else steps):
            model.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            scalar_loss(run(xx)).backward()
        return [xx.grad.double(), *(p.grad.double() for p in model.parameters())], run

    rows = []
    for depth, seed, input_seed in cases:
        net = healthy_chain(depth, channels=6, seed=seed)
        torch.manual_seed(input_seed)
        x = torch.randn(3, 6, 5, 5)
        truth, _ = grads(copy.deepcopy(net).double(), x.double())
        n = len(list(net))
        providers = {"plain float32": (None, None), "rebuilt from the top": ({}, math.inf),
                     "default (drift anchors)": ({}, None),
                     "anchors in forward": ({"anchor_every": math.ceil(math.sqrt(n))}, math.inf)}
        for name, (options, threshold) in providers.items():
            saved = engine.DRIFT
            engine.DRIFT = saved if threshold is None else threshold
            try:
                got, model = grads(net, x, options)
            finally:
                engine.DRIFT = saved
            report = getattr(model, "last_report", None)
            rows.append({
                "blocks": n, "seed": seed, "input_seed": input_seed, "provider": name,
                "worst_tensor": max(relative(a, b) for a, b in zip(got, truth)),
                "whole": relative(torch.cat([g.flatten() for g in got]), torch.cat([t.flatten() for t in truth])),
                "anchors": [] if report is None else report.anchors,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=1e-5, help="gradient error counted as within target")
    parser.add_argument("--fresh", action="store_true", help="a new wrapper per step (no adaptive state)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--stage-truth", action="store_true",
                        help="only: the 12-block RevNet stage's float32 gradients against the float64 truth")
    parser.add_argument("--drift", action="store_true",
                        help="only: deep healthy float32 chains against the float64 truth, drift anchors or not")
    args = parser.parse_args(argv)
    if args.drift:
        torch.set_num_threads(args.threads)
        rows = drift()
        print("| blocks | seeds (chain, input) | provider | worst tensor vs float64 truth | whole gradient | "
              "anchors (last step) |")
        print("|---:|---:|---|---:|---:|---|")
        for r in rows:
            print(f"| {r['blocks']} | {r['seed']}, {r['input_seed']} | {r['provider']} | "
                  f"{r['worst_tensor']:.2e} | {r['whole']:.2e} | {r['anchors']} |")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.stage_truth:
        torch.set_num_threads(args.threads)
        for name, error in stage_truth().items():
            print(f"{name}: {error:.2e} from the float64 truth")
        return 0
    result = run(args)
    print(f"{args.steps} steps, gradient error vs plain autograd (relative L2, all parameters), "
          f"target {args.target:g}; probed steps: {result['probed_steps']}")
    print(f"kink steps (float32 rounding crossed a ReLU kink in plain's forward): {result['kink_steps']}")
    print("| provider | within target of plain | of the float64 truth | of plain's distance to the truth | "
          "off plain, no kink | vs plain: median | max | vs float64 truth: median | max | corrections | "
          "step time x off |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, s in result["summary"].items():
        odd = s["off_plain_no_kink"]
        vs_plain = ("-",) * 4 if name == "plain" else (
            f"{100 * s['within_target']:.2f} %", str(odd) if len(odd) <= 8 else f"{len(odd)} steps",
            f"{s['median']:.2e}", f"{s['max']:.2e}")
        cells = (name, vs_plain[0], f"{100 * s['within_target_truth']:.2f} %", f"{100 * s['as_plain']:.2f} %",
                 *vs_plain[1:], f"{s['truth_median']:.2e}", f"{s['truth_max']:.2e}", str(s["corrections"]),
                 f"{result['timing'][name]['x_off']:.3f}")
        print("| " + " | ".join(cells) + " |")
    print(f"step time: off {result['timing']['off']['x_plain']:.3f} x plain autograd ({args.threads} thread)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
