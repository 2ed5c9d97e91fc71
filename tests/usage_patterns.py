"""Machinery of the usage-fuzz suite (``tests/test_usage_fuzz.py``): patterns, outcomes, comparisons.

A *pattern* is one way a user may drive a revgrad chain. It builds its blocks with a fixed seed, builds a
plain-autograd reference with the same weights, runs the usage both ways and compares what matters. Its
result is one of four outcomes:

* ``"equal"``: no exception, and everything compared agrees with plain autograd;
* ``"clear error"``: an exception of type ``revgrad.BlockError``, ``revgrad.ReconstructionError``,
  ``TypeError``, ``ValueError`` or ``RuntimeError`` whose message starts with ``"revgrad"`` and (when the
  pattern is about one block) names ``"block <index>"`` and whatever else the pattern requires;
* ``"silent wrong"``: no exception, but results differ (the pattern raises :class:`Mismatch`);
* ``"crash"``: any other exception, or an error whose message is not clear in the sense above.

A failure of the plain-autograd reference itself is a defect of the test, reported as ``"test bug"``.

``USAGE_FUZZ_SELFTEST=1`` makes :func:`wrap` return a plain chain (:class:`PlainChain`) instead of
revgrad's: every pattern whose intended outcome is ``"equal"`` must then come out equal, which validates
the reference computations independently of the library.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

import revgrad

F64 = torch.float64
TOL64 = 1e-10  # float64: rounding only
TOL32 = 1e-5  # float32 chains of a few blocks (stated per pattern where another value is used)

EQUAL, CLEAR, SILENT, CRASH, TEST_BUG = "equal", "clear error", "silent wrong", "crash", "test bug"
SKIPPED = "skipped"  # an optional peer library is not installed
OPTIONAL_PEERS = ("memcnn", "normflows", "FrEIA", "revlib")
CLEAR_TYPES: tuple[type[BaseException], ...] = (
    revgrad.BlockError, revgrad.ReconstructionError, TypeError, ValueError, RuntimeError,
)
SELFTEST = os.environ.get("USAGE_FUZZ_SELFTEST", "") not in ("", "0")


class Mismatch(Exception):
    """revgrad ran without an exception but its results differ from plain autograd's (or from the spec)."""


class ReferenceFailure(Exception):
    """The plain-autograd reference itself failed: a defect of the test, not of the library."""


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Wrap plain-autograd reference computations: their exceptions are test bugs, not library results."""
    try:
        yield
    except (Mismatch, ReferenceFailure):
        raise
    except Exception as e:
        raise ReferenceFailure(f"{type(e).__name__}: {e}") from e


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with the CPU generator seeded, leaving the caller's generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# The one relative-error helper and comparisons


def rel_err(actual: object, expected: object) -> float:
    """Relative L2 distance ``||a - e|| / ||e||`` in float64 (absolute when ``e`` is zero).

    ``inf`` for a shape or None mismatch; NaN/Inf must sit at the same places with the same values.
    """
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else math.inf
    a = torch.as_tensor(actual).detach().to("cpu", F64)
    e = torch.as_tensor(expected).detach().to("cpu", F64)
    if a.shape != e.shape:
        return math.inf
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    if not (torch.equal(fa, fe) and torch.equal(a[~fa].nan_to_num(), e[~fe].nan_to_num())):
        return math.inf
    a, e = a[fa], e[fe]
    denom = torch.linalg.vector_norm(e).item()
    num = torch.linalg.vector_norm(a - e).item()
    return num if denom == 0.0 else num / denom


def _flatten(prefix: str, value: object, out: dict[str, object]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (tuple, list)):
        out[f"{prefix}#len"] = len(value)
        for k, v in enumerate(value):
            _flatten(f"{prefix}[{k}]", v, out)
    else:
        out[prefix] = value


def assert_same(got: object, want: object, tol: float = TOL64, what: str = "") -> str:
    """Compare nested results (dicts, tuples, tensors, numbers, None) with one tolerance.

    Raises :class:`Mismatch` naming the worst entries; returns a one-line detail on success.
    """
    g: dict[str, object] = {}
    w: dict[str, object] = {}
    _flatten("", got, g)
    _flatten("", want, w)
    bad: list[tuple[float, str]] = []
    worst = 0.0
    for key in sorted(set(g) | set(w)):
        if key not in g or key not in w:
            bad.append((math.inf, f"{key}: {'missing' if key not in g else 'unexpected'}"))
            continue
        a, e = g[key], w[key]
        if isinstance(e, (str, bool)) or isinstance(a, (str, bool)):
            if a != e:
                bad.append((math.inf, f"{key}: {a!r} != {e!r}"))
            continue
        if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor) and a.dtype != e.dtype:
            bad.append((math.inf, f"{key}: dtype {a.dtype} != {e.dtype}"))
            continue
        err = rel_err(a, e)
        worst = max(worst, err)
        if not err <= tol:
            if a is None or e is None:
                bad.append((math.inf, f"{key}: {'None' if a is None else 'tensor'} where plain has "
                                      f"{'None' if e is None else 'a tensor'}"))
            elif err == math.inf and torch.as_tensor(a).shape != torch.as_tensor(e).shape:
                shapes = tuple(torch.as_tensor(a).shape), tuple(torch.as_tensor(e).shape)
                bad.append((err, f"{key}: shape {shapes[0]} != {shapes[1]}"))
            else:
                bad.append((err, f"{key}: rel err {err:.3g} > {tol:g}"))
    if bad:
        bad.sort(key=lambda t: -t[0])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise Mismatch(f"{what + ': ' if what else ''}" + "; ".join(b for _, b in bad[:3]) + more)
    return f"{len(g)} quantities, max rel err {worst:.2g} (tol {tol:g})"


# --------------------------------------------------------------------------------------------------
# Plain reference chain (and the self-test stand-in for revgrad)


def split_out(out: object) -> tuple[torch.Tensor, object]:
    if isinstance(out, torch.Tensor):
        return out, None
    y, ld = out
    return y, ld


def broadcast_logdet(ld: object, y: torch.Tensor) -> object:
    """A logdet of shape ``()``, ``[1]`` or a Python number as ``[B]`` (what the chain must return)."""
    if ld is None:
        return None
    b = y.shape[0]
    if not isinstance(ld, torch.Tensor):
        return torch.full((b,), float(ld), dtype=y.dtype, device=y.device)
    if ld.dim() == 0 or (ld.dim() == 1 and ld.shape[0] == 1 and b != 1):
        return ld.reshape(()).expand(b)
    return ld


def plain_forward(blocks, x: torch.Tensor):
    """Run blocks with plain autograd, summing logdets (broadcast to ``[B]``) like a chain."""
    logdet = None
    h = x
    for block in blocks:
        out = block(h)
        if isinstance(out, (tuple, list)):
            h, ld = out
            ld = broadcast_logdet(ld, h)
            logdet = ld if logdet is None else logdet + ld
        else:
            h = out
    return h if logdet is None else (h, logdet)


def plain_inverse(blocks, y: torch.Tensor) -> torch.Tensor:
    h = y
    for block in reversed(list(blocks)):
        out = block.inverse(h)
        h = out[0] if isinstance(out, (tuple, list)) else out
    return h


class _FakeReport:
    def __init__(self, n: int) -> None:
        self.errors = [0.0] * n
        self.corrected: list[int] = []
        self.from_adaptive: list[int] = []
        self.tol = 1.0
        self.anchors: list[int] = []


class PlainChain(nn.Sequential):
    """An ``nn.Sequential`` of blocks run with plain autograd; same child names as a ReversibleSequential."""

    @property
    def kept_blocks(self) -> list[int]:
        return []

    def forward(self, x):  # type: ignore[override]
        return plain_forward(list(self), x)

    def inverse(self, y):
        return plain_inverse(list(self), y)

    @property
    def last_report(self):
        return _FakeReport(len(self))

    def configure(self, **_: object) -> PlainChain:
        return self


def wrap(module, **options):
    """``revgrad.reversible(module, **options)``; under USAGE_FUZZ_SELFTEST a plain stand-in instead."""
    if not SELFTEST:
        return revgrad.reversible(module, **options)
    if isinstance(module, (list, tuple)):
        return PlainChain(*module)
    if type(module) is nn.Sequential and all(revgrad.is_block(m) for m in module):
        return PlainChain(*module)
    return module


class FrEIAPlain(nn.Module):
    """The plain reference of ``revgrad.FrEIABlock``, independent of revgrad: calls the FrEIA module
    itself (child ``module``, so parameter names agree) and broadcasts its log_jac_det to ``[B]``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        (y,), jac = self.module([x], rev=False, jac=True)
        return y, broadcast_logdet(jac, y)

    def inverse(self, y):
        (x,), _ = self.module([y], rev=True, jac=False)
        return x


def plain_blocks(blocks: list[nn.Module]) -> list[nn.Module]:
    """A deep copy of ``blocks`` for the reference, FrEIA adapters replaced by :class:`FrEIAPlain`."""
    copied = copy.deepcopy(blocks)
    return [FrEIAPlain(b.module) if isinstance(b, revgrad.FrEIABlock) else b for b in copied]


def twins(make: Callable[[], list[nn.Module]], seed: int = 0, **options) -> tuple[PlainChain, nn.Module]:
    """``(plain, rev)``: the same blocks (seeded build), plain on a deep copy, rev through :func:`wrap`."""
    with seeded(seed):
        blocks = make()
    plain = PlainChain(*plain_blocks(blocks))
    return plain, wrap(nn.Sequential(*blocks), **options)


# --------------------------------------------------------------------------------------------------
# Steps and their observable results


def make_x(*shape: int, seed: int = 1, dtype: torch.dtype = F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def loss_of(out: object) -> torch.Tensor:
    """A loss weighing every output element (and every sample's logdet) differently."""
    y, ld = split_out(out)
    yf = y if y.dtype in (torch.float32, F64) else y.float()
    w = torch.linspace(-1.0, 2.0, max(yf.numel(), 1), dtype=F64)[: yf.numel()].reshape(yf.shape).to(yf.dtype)
    loss = (yf * w).sum() + 0.5 * (yf * yf).sum()
    if ld is not None:
        ld = torch.as_tensor(ld)
        ldf = ld if ld.dtype in (torch.float32, F64) else ld.float()
        loss = loss + (ldf * torch.arange(1, ldf.numel() + 1, dtype=ldf.dtype).reshape(ldf.shape)).sum()
    return loss


def detached(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


def grads(model: nn.Module) -> dict[str, object]:
    return {n: detached(p.grad) for n, p in model.named_parameters()}


def params(model: nn.Module) -> dict[str, object]:
    return {n: detached(p) for n, p in model.named_parameters()}


def buffers(model: nn.Module) -> dict[str, object]:
    return {n: detached(b) for n, b in model.named_buffers()}


def step(model: nn.Module, x0: torch.Tensor, *, loss: Callable = loss_of, x_grad: bool = True,
         between: Callable[[nn.Module], None] | None = None) -> dict[str, object]:
    """One forward and backward of ``model`` at a fresh leaf copy of ``x0``: what it leaves behind."""
    x = x0.detach().clone().requires_grad_(x_grad)
    out = model(x)
    if between is not None:
        between(model)
    loss(out).backward()
    return {"out": detached(out), "x.grad": detached(x.grad), "grad": grads(model), "buf": buffers(model)}


def train(model: nn.Module, xs: list[torch.Tensor], *, lr: float = 0.0, adam: bool = False, seed: int = 1234,
          rng: bool = False, after: Callable[[nn.Module, int], None] | None = None, **kw) -> list[dict[str, object]]:
    """Steps at ``xs`` (the generator seeded before each forward); with ``lr`` an optimizer step after each
    backward; ``after(model, t)`` runs after step ``t`` (checks of the report)."""
    opt = None
    if lr:
        opt = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=lr)
    states = []
    for t, x0 in enumerate(xs):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed + t)
        s = step(model, x0, **kw)
        if rng:
            s["rng"] = torch.get_rng_state()
        if after is not None:
            after(model, t)
        if opt is not None:
            opt.step()
            s["param"] = params(model)
        states.append(s)
    return states


def compare_training(plain: nn.Module, rev: nn.Module, xs: list[torch.Tensor], tol: float = TOL64,
                     after: Callable[[nn.Module, int], None] | None = None, **kw) -> str:
    """Run the same steps on ``plain`` (the reference) and ``rev``; compare every step's results."""
    with reference():
        want = train(plain, xs, **kw)
    got = train(rev, xs, after=after, **kw)
    return assert_same(got, want, tol)


# --------------------------------------------------------------------------------------------------
# Patterns and outcomes


@dataclass
class Pattern:
    name: str
    fn: Callable[[], object]
    allowed: tuple[str, ...] = (EQUAL,)
    contains: tuple[str, ...] = ()  # regexes (case-insensitive) a clear error must match
    block: int | None = None  # the pattern is about this block: a clear error must say "block <index>"
    types: tuple[type[BaseException], ...] = CLEAR_TYPES  # exception types a clear error may have
    torch_clear: str | None = None  # regex: torch's own message that counts as clear (autograd refusals)
    intent: str = ""


@dataclass
class Result:
    name: str
    outcome: str
    detail: str
    seconds: float
    allowed: bool = field(default=False)


def first_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def classify_error(p: Pattern, e: BaseException) -> tuple[str, str]:
    msg = str(e)
    what = f"{type(e).__name__}: {first_line(msg)}"
    if p.torch_clear is not None and isinstance(e, RuntimeError) and re.search(p.torch_clear, msg, re.I):
        return CLEAR, what
    if not isinstance(e, CLEAR_TYPES) or not msg.startswith("revgrad"):
        return CRASH, what
    if not isinstance(e, p.types):
        return CRASH, f"unexpected type ({', '.join(t.__name__ for t in p.types)} wanted): {what}"
    missing = []
    if p.block is not None and not re.search(rf"\bblock {p.block}\b", msg):
        missing.append(f"'block {p.block}'")
    missing += [repr(rx) for rx in p.contains if not re.search(rx, msg, re.I)]
    if missing:
        return CRASH, f"unclear message (lacks {', '.join(missing)}): {what}"
    return CLEAR, what


def run_pattern(p: Pattern) -> Result:
    start = time.perf_counter()
    grad_mode = torch.is_grad_enabled()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        try:
            detail = p.fn()
            outcome, detail = EQUAL, (detail if isinstance(detail, str) else "")
        except Mismatch as e:
            outcome, detail = SILENT, first_line(str(e), 240)
        except ReferenceFailure as e:
            outcome, detail = TEST_BUG, first_line(str(e))
        except ModuleNotFoundError as e:
            if e.name not in OPTIONAL_PEERS:
                raise
            outcome, detail = SKIPPED, f"{e.name} is not installed"
        except Exception as e:
            outcome, detail = classify_error(p, e)
        finally:
            torch.set_grad_enabled(grad_mode)
    return Result(p.name, outcome, detail, time.perf_counter() - start, outcome in (*p.allowed, SKIPPED))


def table(results: list[Result], patterns: dict[str, Pattern]) -> str:
    w = max(len(r.name) for r in results)
    lines = [f"{'pattern':<{w}}  {'intended':<22}  {'outcome':<12}  {'s':>5}  detail"]
    for r in results:
        intended = " | ".join(patterns[r.name].allowed)
        flag = "" if r.allowed else "  <-- not allowed"
        lines.append(f"{r.name:<{w}}  {intended:<22}  {r.outcome:<12}  {r.seconds:5.2f}  {r.detail}{flag}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    lines.append("counts: " + ", ".join(f"{k}={counts.get(k, 0)}" for k in (EQUAL, CLEAR, SILENT, CRASH, TEST_BUG))
                 + f"; allowed {sum(r.allowed for r in results)}/{len(results)}"
                 + f"; {sum(r.seconds for r in results):.1f} s")
    return "\n".join(lines)


def compare_usage(plain: nn.Module, rev: nn.Module, usage: Callable[[nn.Module], object], tol: float = TOL64,
                  seed: int = 1234) -> str:
    """``usage(model)`` on the plain reference and on revgrad's model, the generator seeded alike before
    each; compares what it returns (nested dicts/tuples of tensors and numbers)."""
    with reference():
        torch.manual_seed(seed)
        want = detached(usage(plain))
    torch.manual_seed(seed)
    got = detached(usage(rev))
    return assert_same(got, want, tol)
