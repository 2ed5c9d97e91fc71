"""Held memory and step time of one Glow density model in five implementations, side by side.

    python bench/flow_peers.py --depth 8 --rounds 10           # 3x32x32, batch 16, 3 levels, hidden 64

Providers (a training step: ``loss = -mean log p(x) / D``, backward, ``zero_grad(set_to_none=True)``):

* ``plain``: ``revgrad.models.glow(memory_saving=False)`` (plain autograd);
* ``revgrad-off`` / ``revgrad-correct``: the same model, ``memory_saving=True`` with ``check="off"`` /
  ``"correct"``, loaded with plain's weights (gradients compared with plain's before measuring);
* ``freia``: FrEIA ``GraphINN``: per level ``IRevNetDownsampling`` then ``depth`` x [``ActNorm``,
  ``Fixed1x1Conv`` (a random orthogonal matrix, frozen: FrEIA 0.2 has no learned 1x1 convolution),
  ``AffineCouplingOneSided`` (exp scale, atan soft clamp)], ``Split`` off half the channels;
* ``normflows``: ``MultiscaleFlow`` of ``GlowBlock`` (ActNorm, LU 1x1 convolution, sigmoid affine
  coupling) with ``Squeeze`` and ``Merge``, fixed standard-normal ``DiagGaussian`` latents.

Every coupling network is Glow's ``Conv3x3 -> ReLU -> Conv1x1 -> ReLU -> Conv3x3`` of width ``--hidden``
(the peers' own constructors; FrEIA gets ``revgrad.models.glow.glow_conditioner``), standard-normal
priors everywhere. The peers have their own weights; every zero-initialized last convolution is drawn
from N(0, 1e-3) so the couplings are not the identity. Held: bytes forward leaves allocated until
backward; peak: the largest allocation in the step (glibc between ATen operators on CPU,
``max_memory_allocated`` on CUDA), both above the level before the step (weights and input
allocated). Time: interleaved rounds (``revgrad.tools.measure.time_interleaved``), median step and
the ratio to plain paired per round; one torch thread on CPU unless ``--threads``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from revgrad.models import glow
from revgrad.models.glow import glow_conditioner
from revgrad.tools.benchrun import bench_session
from revgrad.tools.measure import step_memory, time_interleaved

MIB = 2**20
PROVIDERS = ("plain", "revgrad-off", "revgrad-correct", "freia", "normflows")
PEER_MODULES = {"freia": "FrEIA", "normflows": "normflows"}
_LOG_2PI = math.log(2 * math.pi)


def _std_normal(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (z.square() + _LOG_2PI)).flatten(1).sum(1)


def _unzero(module: nn.Module, seed: int) -> None:
    """Draw every all-zero convolution weight (the couplings' last layers) from N(0, 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad and not m.weight.abs().sum():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 1e-3)


# ------------------------------------------------------------------------------------------------
# The models: each returns (module, log_prob: x -> [B]).


def build_revgrad(args, saving: bool, check: str = "correct"):
    model = glow(args.channels, args.size, levels=args.levels, depth=args.depth, hidden=args.hidden,
                 coupling="affine", scale="sigmoid", prior="standard", memory_saving=saving, check=check)
    return model, model.log_prob


def build_freia(args):
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    g = torch.Generator().manual_seed(args.seed)
    nodes = [Ff.InputNode(args.channels, args.size, args.size, name="x")]
    outputs = []
    c = args.channels
    for level in range(args.levels):
        nodes.append(Ff.Node(nodes[-1], Fm.IRevNetDownsampling, {}, name=f"squeeze{level}"))
        c *= 4
        for k in range(args.depth):
            q = torch.linalg.qr(torch.randn(c, c, generator=g)).Q
            nodes.append(Ff.Node(nodes[-1], Fm.ActNorm, {}, name=f"actnorm{level}.{k}"))
            nodes.append(Ff.Node(nodes[-1], Fm.Fixed1x1Conv, {"M": q}, name=f"conv1x1_{level}.{k}"))
            nodes.append(Ff.Node(nodes[-1], Fm.AffineCouplingOneSided,
                                 {"subnet_constructor": lambda ci, co: glow_conditioner(ci, co, args.hidden)},
                                 name=f"coupling{level}.{k}"))
        if level < args.levels - 1:
            split = Ff.Node(nodes[-1], Fm.Split, {"section_sizes": [c // 2, c - c // 2], "dim": 0},
                            name=f"split{level}")
            nodes.append(split)
            outputs.append(Ff.OutputNode(split.out1, name=f"z{level}"))
            c //= 2
    outputs.append(Ff.OutputNode(nodes[-1], name="z_top"))
    inn = Ff.GraphINN(nodes + outputs)

    def log_prob(x):
        zs, log_jac = inn(x)
        return log_jac + sum(_std_normal(z) for z in zs)

    return inn, log_prob


def build_normflows(args):
    import normflows as nf

    q0, merges, flows = [], [], []
    L, C, S = args.levels, args.channels, args.size
    for i in range(L):  # i = 0: the coarsest level (normflows orders levels from the latent side)
        ch = C * 2 ** (L + 1 - i)
        level = [nf.flows.GlowBlock(ch, args.hidden, scale=True, scale_map="sigmoid", split_mode="channel",
                                    use_lu=True) for _ in range(args.depth)]
        flows.append([*level, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (C * 2 ** (L - i), S // 2 ** (L - i), S // 2 ** (L - i))
        else:
            shape = (C * 2 ** (L + 1), S // 2**L, S // 2**L)
        q0.append(nf.distributions.DiagGaussian(shape, trainable=False))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    return model, lambda x: model.log_prob(x, None)


def build(name: str, args):
    if name == "plain":
        return build_revgrad(args, False)
    if name == "revgrad-off":
        return build_revgrad(args, True, "off")
    if name == "revgrad-correct":
        return build_revgrad(args, True, "correct")
    return {"freia": build_freia, "normflows": build_normflows}[name](args)


def n_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; buffers not counted."""
    t = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return t, sum(p.numel() for p in module.parameters() if not p.requires_grad)


# ------------------------------------------------------------------------------------------------
# The step.


class DensityStep:
    """``loss = -mean log p(x) / D``; backward; ``zero_grad(set_to_none=True)``. The input is fixed."""

    def __init__(self, module: nn.Module, log_prob: Callable, x: torch.Tensor) -> None:
        self.module, self.log_prob, self.x = module, log_prob, x
        module.train()

    def prepare(self) -> None:
        pass

    def prime(self) -> None:
        pass

    def forward(self) -> torch.Tensor:
        return -self.log_prob(self.x).mean() / self.x[0].numel()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.module.zero_grad(set_to_none=True)

    def run(self) -> None:
        self.backward(self.forward())


def _grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in module.parameters() if p.requires_grad])


def first_step(steps: dict[str, DensityStep]) -> tuple[dict[str, float], dict[str, float]]:
    """One step each (ActNorm's data-dependent init happens here): the initial loss (nats/dim + ln 256
    in bits/dim is not added: the input is not dequantized bytes) and, for revgrad, the relative L2
    error of all gradients against plain's (same weights)."""
    losses, errors = {}, {}
    for name, step in steps.items():
        loss = step.forward()
        losses[name] = loss.item()
        loss.backward()
        if name.startswith("revgrad") and "plain" in steps:
            ref = _grads(steps["plain"].module)
            errors[name] = ((_grads(step.module) - ref).norm() / ref.norm()).item()
        if name != "plain":
            step.module.zero_grad(set_to_none=True)
    if "plain" in steps:
        steps["plain"].module.zero_grad(set_to_none=True)
    return losses, errors


# ------------------------------------------------------------------------------------------------


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-peak", action="store_true", help="skip the peak (slow on CPU: read after every op)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    notes: list[str] = []

    names = []
    for name in args.providers:
        mod = PEER_MODULES.get(name)
        if mod is not None and importlib.util.find_spec(mod) is None:
            notes.append(f"{name}: skipped ({mod} is not installed)")
            continue
        names.append(name)

    result: dict = {"rows": {}, "notes": notes}
    with bench_session(device, args.threads) as pinned:
        threads = torch.get_num_threads()
        models, params = {}, {}
        for name in names:
            torch.manual_seed(args.seed)
            module, log_prob = build(name, args)
            _unzero(module, args.seed)
            models[name] = (module.to(device), log_prob)
            params[name] = n_params(module)
        for name in ("revgrad-off", "revgrad-correct"):
            if name in models and "plain" in models:
                models[name][0].load_state_dict(models["plain"][0].state_dict())
        g = torch.Generator().manual_seed(args.seed)
        x = ((torch.randint(0, 256, (args.batch, args.channels, args.size, args.size), generator=g)
              + torch.rand(args.batch, args.channels, args.size, args.size, generator=g)) / 256 - 0.5).to(device)
        steps = {n: DensityStep(m, lp, x) for n, (m, lp) in models.items()}
        losses, errors = first_step(steps)

        memory = {}
        for name, step in steps.items():
            if args.no_peak:
                step.run()
                from revgrad.tools.memory import MemoryProbe
                with MemoryProbe(device) as probe:
                    loss = step.forward()
                    held = probe.mark("held")
                    step.backward(loss)
                    del loss
                memory[name] = (held, probe.peak if device.type == "cuda" else None)
            else:
                m = step_memory(step, device)
                memory[name] = (m.held_bytes, m.peak_bytes)
            print(f"memory {name} done", file=sys.stderr, flush=True)
        timings = time_interleaved(steps, rounds=args.rounds, per_round=args.per_round, warmup=1, device=device)

    plain_held = memory.get("plain", (None,))[0]
    lines = [
        "| provider | parameters (trainable + frozen) | held MiB | peak MiB | step ms (median) | time x plain"
        " | held % plain | initial loss (nats/dim) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        held, peak = memory[name]
        ratio = timings.ratio(name) if "plain" in names else None
        t, f = params[name]
        row = {
            "parameters": t, "frozen_parameters": f, "held_bytes": held, "peak_bytes": peak,
            "step_ms": timings.median_ms(name), "time_x_plain": ratio,
            "held_pct_plain": None if not plain_held else 100 * held / plain_held,
            "initial_loss": losses[name], "grad_rel_err_vs_plain": errors.get(name),
        }
        result["rows"][name] = row
        lines.append(
            f"| {name} | {t:,}" + (f" + {f:,}" if f else "") + f" | {held / MIB:.2f} | "
            + ("–" if peak is None else f"{peak / MIB:.2f}") + f" | {row['step_ms']:.1f} | "
            + ("–" if ratio is None else f"{ratio:.2f}") + " | "
            + ("–" if row["held_pct_plain"] is None else f"{row['held_pct_plain']:.1f} %")
            + f" | {losses[name]:.4f} |"
        )
    cmd = "python bench/flow_peers.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = [
        f"Command: `{cmd.strip()}`",
        f"torch {torch.__version__}, revgrad commit {_commit()}, FrEIA {_version('FrEIA')}, "
        f"normflows {_version('normflows')}, device {device}, torch threads {threads}, "
        f"malloc pinned: {pinned}",
        f"Glow: {args.channels}x{args.size}x{args.size}, batch {args.batch}, levels {args.levels}, depth "
        f"{args.depth}, hidden {args.hidden}, affine couplings; {args.rounds} rounds x {args.per_round} steps",
        "",
    ]
    for name, err in errors.items():
        notes.append(f"{name}: gradients vs plain, relative L2 error {err:.2e}")
    print("\n".join(header + lines + [""] + [f"- {n}" for n in notes]))
    return result


if __name__ == "__main__":
    main()
