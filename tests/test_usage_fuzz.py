"""Usage fuzz: many ways a (hostile) user may drive a revgrad chain, each against plain autograd.

Every pattern builds its blocks with a fixed seed, a plain-autograd reference with the same weights (a deep
copy made before wrapping), runs the usage both ways and compares outputs, logdets, input and parameter
gradients, buffers (BatchNorm statistics, ``num_batches_tracked``), parameters after optimizer steps and the
caller's RNG state where they are involved. Float64 throughout with a relative tolerance of 1e-10 (one
helper, ``usage_patterns.rel_err``), unless a pattern states another dtype and tolerance.

Each pattern declares the outcomes it allows (see ``usage_patterns``): mostly ``"equal"``; refusals allow
``"clear error"`` (a revgrad error naming the block and what went wrong). ``test_pattern`` runs one
pattern; ``test_summary`` prints the table of all of them (results are cached, nothing runs twice) and
asserts that no pattern is silently wrong or crashes.

``USAGE_FUZZ_SELFTEST=1`` replaces revgrad by a plain chain to validate the references: every pattern
intended "equal" must then come out equal.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import threading
import time
import types

import pytest
import torch
from torch import nn
from usage_patterns import (
    CLEAR,
    CRASH,
    EQUAL,
    F64,
    SELFTEST,
    SILENT,
    SKIPPED,
    TEST_BUG,
    Mismatch,
    Pattern,
    PlainChain,
    ReferenceFailure,
    Result,
    assert_same,
    compare_training,
    compare_usage,
    detached,
    grads,
    loss_of,
    make_x,
    params,
    reference,
    run_pattern,
    seeded,
    step,
    table,
    train,
    twins,
    wrap,
)

import revgrad

MODES = ("off", "detect", "correct")
PATTERNS: dict[str, Pattern] = {}


def pattern(name: str, allowed=(EQUAL,), *, contains=(), block=None, types=None, torch_clear=None, intent=""):
    def register(fn):
        assert name not in PATTERNS, name
        kw = {} if types is None else {"types": types}
        PATTERNS[name] = Pattern(name, fn, tuple(allowed), tuple(contains), block, torch_clear=torch_clear,
                                 intent=intent, **kw)
        return fn

    return register


# --------------------------------------------------------------------------------------------------
# Blocks


def mlp(cin: int, cout: int, hidden: int = 6, *, dropout: float = 0.0, bn: bool = False,
        inplace_first: bool = False, drop: type[nn.Module] | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.ReLU(inplace=True)] if inplace_first else []
    # No bias before a BatchNorm: its gradient is zero in exact arithmetic (rounding noise only).
    layers.append(nn.Linear(cin, hidden, bias=not bn))
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Tanh())
    if dropout:
        layers.append((drop or nn.Dropout)(dropout))
    layers.append(nn.Linear(hidden, cout))
    return nn.Sequential(*layers)


def conv_branch(c: int, bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c, c, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c))
    layers += [nn.Tanh(), nn.Conv2d(c, c, 3, padding=1)]
    return nn.Sequential(*layers)


class UserCoupling(nn.Module):
    """A user's own two-step coupling (no fused path): ``y1 = x1 + f(x2); y2 = x2 + g(y1)``; its inverse
    evaluates ``g`` before ``f``."""

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y):
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=1)


class Scale(nn.Module):
    """``y = x * exp(log_scale)`` per channel; ``logdet`` of shape ``kind``: "B" ([B]), "0dim", "1" ([1]),
    "number" (a Python float) or "B1" ([B, 1], not allowed)."""

    def __init__(self, channels: int = 4, kind: str = "B") -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(-0.3, 0.4, channels, dtype=F64))
        self.kind = kind

    def _s(self, x):
        return self.log_scale.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x):
        y = x * torch.exp(self._s(x))
        per = self.log_scale.sum() * math.prod(x.shape[2:])  # log|det| per sample
        b = x.shape[0]
        if self.kind == "B":
            ld = per * x.new_ones(b)
        elif self.kind == "0dim":
            ld = per
        elif self.kind == "1":
            ld = per.reshape(1)
        elif self.kind == "number":
            ld = 0.25
        else:  # "B1"
            ld = per * x.new_ones(b, 1)
        return y, ld

    def inverse(self, y):
        return y * torch.exp(-self._s(y))


class Flip(nn.Module):
    def forward(self, x):
        return x.flip(1)

    def inverse(self, y):
        return y.flip(1)


class Shift(nn.Module):
    """``y = x + shift``; counts its training forwards in a buffer (``calls += 1``, in place)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.linspace(0.1, 0.4, channels, dtype=F64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x + self.shift

    def inverse(self, y):
        return y - self.shift


class ToDouble(nn.Module):
    """Float32 in, float64 out (a float64 scale); the inverse returns float32."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(-0.2, 0.3, channels, dtype=F64))

    def forward(self, x):
        return x.to(F64) * torch.exp(self.log_scale)

    def inverse(self, y):
        return (y * torch.exp(-self.log_scale)).to(torch.float32)


class BadInverseShape(Scale):
    def inverse(self, y):
        return super().inverse(y)[:, :3]


class RecordingDropout(nn.Module):
    """Dropout that records every mask it draws (``calls``), or uses given masks (``feed``, the reference).

    It sleeps briefly before drawing, so that a concurrent thread runs between the engine's RNG snapshot
    and the draw.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.calls: list[torch.Tensor] = []
        self.feed: list[torch.Tensor] | None = None

    def forward(self, x):
        if not self.training:
            return x
        if self.feed is not None:
            mask = self.feed.pop(0)
        else:
            time.sleep(0.0003)
            mask = (torch.rand(x.shape, dtype=x.dtype) >= self.p).to(x.dtype) / (1.0 - self.p)
            self.calls.append(mask)
        return x * mask


def mixed(*, dropout: float = 0.0, bn: bool = False, dtype=F64) -> list[nn.Module]:
    """Fused additive and affine couplings, a user coupling, a logdet block and a permutation (C = 4)."""
    kw = dict(dropout=dropout, bn=bn)
    blocks = [
        revgrad.AdditiveCoupling(mlp(2, 2, **kw), mlp(2, 2, **kw)),
        revgrad.AffineCoupling(mlp(2, 4, **kw), scale="sigmoid"),
        UserCoupling(mlp(2, 2, **kw), mlp(2, 2, **kw)),
        Scale(4),
        Flip(),
        revgrad.AdditiveCoupling(mlp(2, 2, **kw), mlp(2, 2, **kw)),
    ]
    return [b.to(dtype) for b in blocks]


def additive(depth: int = 4, *, dropout: float = 0.0, bn: bool = False) -> list[nn.Module]:
    """Blocks without logdets (composable: ``model(model(x))``)."""
    blocks: list[nn.Module] = []
    for i in range(depth):
        if i % 3 == 2:
            blocks.append(UserCoupling(mlp(2, 2, dropout=dropout, bn=bn), mlp(2, 2, dropout=dropout, bn=bn)))
        else:
            blocks.append(revgrad.AdditiveCoupling(mlp(2, 2, dropout=dropout, bn=bn),
                                                   mlp(2, 2, dropout=dropout, bn=bn)))
        if i % 2 == 1:
            blocks.append(Flip())
    return [b.double() for b in blocks]


def convs(bn: bool = True) -> list[nn.Module]:
    blocks = [
        revgrad.AdditiveCoupling(conv_branch(2, bn), conv_branch(2, bn)),
        revgrad.AffineCoupling(nn.Conv2d(2, 4, 3, padding=1), scale="bounded"),
        Flip(),
        revgrad.AdditiveCoupling(conv_branch(2, bn), conv_branch(2, bn)),
    ]
    return [b.double() for b in blocks]


def X(*shape, seed=1, dtype=F64):
    return make_x(*shape, seed=seed, dtype=dtype)


X2 = [X(3, 4, seed=1), X(3, 4, seed=2)]  # two steps of a [B=3, C=4] chain
X4 = [X(4, 4, seed=1), X(4, 4, seed=2)]  # BatchNorm wants a few samples
XC = [X(2, 4, 3, 3, seed=1), X(2, 4, 3, 3, seed=2)]


# --------------------------------------------------------------------------------------------------
# Baselines (validate the machinery on the simplest usage)

for _mode in MODES:
    @pattern(f"baseline-mixed[{_mode}]", intent="two SGD steps of a mixed chain")
    def _(mode=_mode):
        plain, rev = twins(mixed, check=mode)
        return compare_training(plain, rev, X2, lr=0.05)


for _mode in ("off", "correct"):
    @pattern(f"batchnorm-train-conv[{_mode}]", intent="BatchNorm2d in training mode: stats, counters, params")
    def _(mode=_mode):
        plain, rev = twins(convs, check=mode)
        return compare_training(plain, rev, XC, lr=0.05)


@pattern("float32-adam-steps", intent="float32 chain, three Adam steps (tol 1e-5)")
def _():
    plain, rev = twins(lambda: mixed(dtype=torch.float32))
    xs = [X(3, 4, seed=s, dtype=torch.float32) for s in range(3)]
    return compare_training(plain, rev, xs, tol=1e-5, lr=0.01, adam=True)


# --------------------------------------------------------------------------------------------------
# 1. The same block object twice


for _mode in ("off", "correct"):
    @pattern(f"same-block-twice[{_mode}]", intent="nn.Sequential(b, c, b): runs all three, like nn.Sequential")
    def _(mode=_mode):
        with seeded(0):
            b = revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double()
            c = revgrad.AffineCoupling(mlp(2, 4), scale="exp").double()
        seq = nn.Sequential(b, c, b)
        plain = PlainChain(*copy.deepcopy(list(seq)))  # one deepcopy: b stays shared
        rev = wrap(seq, check=mode)
        return compare_training(plain, rev, X2, lr=0.05)


class Net(nn.Module):
    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.body = body
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(self.stem(x))))


@pattern("same-block-twice-in-model", intent="a larger model converted in place, b used twice")
def _():
    with seeded(0):
        b = revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2))
        c = UserCoupling(mlp(2, 2), mlp(2, 2))
        net = Net(nn.Sequential(b, c, b)).double()
    plain = copy.deepcopy(net)
    rev = wrap(net)
    xs = [X(3, 3, seed=1), X(3, 3, seed=2)]
    return compare_training(plain, rev, xs, lr=0.05)


@pattern("same-block-twice-bn-dropout", intent="nn.Sequential(b, c, b) with BatchNorm and dropout in b")
def _():
    with seeded(0):
        b = revgrad.AdditiveCoupling(mlp(2, 2, bn=True, dropout=0.2), mlp(2, 2, bn=True)).double()
        c = UserCoupling(mlp(2, 2, dropout=0.2), mlp(2, 2)).double()
    seq = nn.Sequential(b, c, b)
    plain = PlainChain(*copy.deepcopy(list(seq)))
    return compare_training(plain, wrap(seq), X4, lr=0.05, rng=True)


@pattern("same-block-in-two-chains", intent="one block object in two chains: m2(m1(x))")
def _():
    with seeded(0):
        a = revgrad.AdditiveCoupling(mlp(2, 2, dropout=0.2), mlp(2, 2)).double()
        shared = revgrad.AffineCoupling(mlp(2, 4), "exp").double()
        b = UserCoupling(mlp(2, 2), mlp(2, 2)).double()
    pa, ps, pb = copy.deepcopy([a, shared, b])
    plain = (PlainChain(pa, ps), PlainChain(ps, pb), nn.ModuleList([pa, ps, pb]))
    rev = (wrap([a, shared]), wrap([shared, b]), nn.ModuleList([a, shared, b]))

    def usage(models):
        m1, m2, everything = models
        x = X2[0].clone().requires_grad_()
        y1, ld1 = m1(x)
        y2, ld2 = m2(y1)
        loss_of((y2, ld1 + ld2)).backward()
        return {"y": y2, "x.grad": x.grad, "grad": grads(everything), "rng": torch.get_rng_state()}

    return compare_usage(plain, rev, usage)


# --------------------------------------------------------------------------------------------------
# 2. Parameters and buffers changed in place between forward and backward


def changed_between(make, mutate, x, **options):
    _, rev = twins(make, **options)
    out = rev(x.clone().requires_grad_())
    mutate(rev)
    loss_of(out).backward()
    raise Mismatch("backward ran although a tensor forward used was changed in place before it")


def _add_(t, v=0.1):
    with torch.no_grad():
        t.add_(v)


for _mode in ("off", "correct"):
    @pattern(f"param-changed-before-backward[{_mode}]", (CLEAR,), block=1, contains=(r"f\.0\.weight",),
             intent="p.add_(0.1) under no_grad between forward and backward")
    def _(mode=_mode):
        changed_between(lambda: additive(3), lambda m: _add_(m[1].f[0].weight), X2[0], check=mode)


@pattern("param-changed-before-backward-affine", (CLEAR,), block=1, contains=(r"net\.0\.weight",),
         intent="the fused affine coupling's conditioner weight changed in place")
def _():
    changed_between(
        lambda: [b.double() for b in (revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)),
                                       revgrad.AffineCoupling(mlp(2, 4), "sigmoid"),
                                       revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)))],
        lambda m: _add_(m[1].net[0].weight), X2[0])


@pattern("optimizer-step-before-backward", (CLEAR,), block=1, contains=("log_scale",),
         intent="optimizer.step() on other (stale) grads between forward and backward")
def _():
    _, rev = twins(lambda: [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), Scale(4),
                            revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double()])
    opt = torch.optim.SGD(rev[1].parameters(), lr=0.1)
    rev[1].log_scale.grad = torch.ones_like(rev[1].log_scale)
    out = rev(X2[0].clone().requires_grad_())
    opt.step()
    loss_of(out).backward()
    raise Mismatch("backward ran although the optimizer changed a parameter forward used")


@pattern("bn-running-mean-changed-eval", (CLEAR,), block=0, contains=("running_mean",),
         intent="BatchNorm in eval mode reads running_mean; it is changed in place before backward")
def _():
    def make():
        return [revgrad.AdditiveCoupling(mlp(2, 2, bn=True), mlp(2, 2)).double(),
                revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), Flip()]

    _, rev = twins(make)
    rev.eval()
    out = rev(X4[0].clone().requires_grad_())
    _add_(rev[0].f[1].running_mean, 0.5)
    loss_of(out).backward()
    raise Mismatch("backward ran although a buffer forward read was changed in place")


@pattern("param-replaced-before-backward", (EQUAL, CLEAR), block=1,
         intent="block.f[0].weight = nn.Parameter(...) between forward and backward: grads to the old one")
def _():
    def usage(model):
        x = X2[0].clone().requires_grad_()
        out = model(x)
        old = model[1].f[0].weight
        model[1].f[0].weight = nn.Parameter(old.detach() + 1.0)
        loss_of(out).backward()
        new = model[1].f[0].weight
        return {"x.grad": x.grad, "old.grad": old.grad, "new.grad": new.grad, "grad": grads(model)}

    plain, rev = twins(lambda: additive(3))
    return compare_usage(plain, rev, usage)


# --------------------------------------------------------------------------------------------------
# 3. Mode switches between forward and backward


def switched(first: str, then: str):
    def usage(model):
        train(model, [X4[0]], lr=0.05)  # a normal step first: non-trivial statistics
        getattr(model, first)()
        x = X4[1].clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        out = model(x)
        getattr(model, then)()
        loss_of(out).backward()
        s = {"out": detached(out), "x.grad": detached(x.grad), "grad": grads(model),
             "buf": detached(dict(model.named_buffers()))}
        model.train()
        s["next"] = train(model, [X4[0]], lr=0.05)
        return s

    return usage


for _mode in ("off", "correct"):
    @pattern(f"bn-eval-forward-train-backward[{_mode}]", intent="eval forward, .train(), backward: stats unmoved")
    def _(mode=_mode):
        plain, rev = twins(lambda: mixed(bn=True), check=mode)
        return compare_usage(plain, rev, switched("eval", "train"))

    @pattern(f"bn-train-forward-eval-backward[{_mode}]", intent="train forward, .eval(), backward")
    def _(mode=_mode):
        plain, rev = twins(lambda: mixed(bn=True), check=mode)
        return compare_usage(plain, rev, switched("train", "eval"))


@pattern("dropout-train-forward-eval-backward", intent="dropout masks of forward used although eval() before backward")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.3))
    return compare_usage(plain, rev, switched("train", "eval"))


@pattern("dropout-eval-forward-train-backward", intent="no dropout in forward: none in backward either")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.3))
    return compare_usage(plain, rev, switched("eval", "train"))


@pattern("eval-mode-training", intent="BatchNorm and dropout in eval mode throughout, SGD steps")
def _():
    plain, rev = twins(lambda: mixed(bn=True, dropout=0.3))
    plain.eval(), rev.eval()
    return compare_training(plain, rev, X4, lr=0.05)


# --------------------------------------------------------------------------------------------------
# 4. Generic blocks whose inverse runs sub-networks in another order than forward


def empty_report(model, t):
    rep = model.last_report
    if rep is None:
        raise Mismatch("no report after backward")
    if rep.corrected:
        raise Mismatch(f"step {t}: report.corrected = {rep.corrected} (no correction was needed)")


def memcnn_dropout():
    import memcnn

    def sub():
        return nn.Sequential(nn.Linear(2, 6), nn.Dropout(0.3), nn.Linear(6, 2))

    blocks = [memcnn.AdditiveCoupling(sub(), sub()), revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)),
              memcnn.AdditiveCoupling(sub(), sub())]
    return [b.double() for b in blocks]


def user_dropout():
    blocks = [UserCoupling(mlp(2, 2, dropout=0.3), mlp(2, 2, dropout=0.3)), Flip(),
              UserCoupling(mlp(2, 2, dropout=0.3), mlp(2, 2, dropout=0.3))]
    return [b.double() for b in blocks]


for _mode in MODES:
    @pattern(f"memcnn-additive-dropout[{_mode}]", intent="memcnn.AdditiveCoupling(Fm, Gm), dropout in both")
    def _(mode=_mode):
        plain, rev = twins(memcnn_dropout, check=mode)
        return compare_training(plain, rev, X2, lr=0.05, rng=True,
                                after=empty_report if mode == "correct" else None)

    @pattern(f"user-two-step-coupling-dropout[{_mode}]", intent="user coupling, inverse g before f, dropout")
    def _(mode=_mode):
        plain, rev = twins(user_dropout, check=mode)
        return compare_training(plain, rev, X2, lr=0.05, rng=True,
                                after=empty_report if mode == "correct" else None)


# --------------------------------------------------------------------------------------------------
# 5. Two threads training their own models with dropout


def recording_chain():
    def sub(cout=2):
        return mlp(2, cout, dropout=0.3, drop=RecordingDropout)

    blocks = [revgrad.AdditiveCoupling(sub(), sub()), UserCoupling(sub(), sub()),
              revgrad.AffineCoupling(sub(4), scale="bounded"), Flip()]
    return [b.double() for b in blocks]


def threads_pattern(mode: str):
    steps = 3
    with seeded(0):
        inits = [recording_chain(), recording_chain()]
    refs = [copy.deepcopy(blocks) for blocks in inits]
    models = [wrap(nn.Sequential(*blocks), check=mode) for blocks in inits]
    barrier = threading.Barrier(2)
    logs: list[list[dict]] = [[], []]
    errors: list[BaseException] = []

    def run(k: int):
        try:
            model = models[k]
            drops = {n: m for n, m in model.named_modules() if isinstance(m, RecordingDropout)}
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            barrier.wait()
            for t in range(steps):
                first = {n: len(m.calls) for n, m in drops.items()}
                model.zero_grad(set_to_none=True)
                s = step(model, X(3, 4, seed=10 * k + t))
                masks = {n: m.calls[first[n]] for n, m in drops.items()}  # the forward's (first) call
                opt.step()
                s["param"] = params(model)
                logs[k].append({"state": s, "masks": masks})
        except BaseException as e:
            errors.append(e)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    details = []
    for k in range(2):
        with reference():
            plain = PlainChain(*refs[k])
            drops = {n: m for n, m in plain.named_modules() if isinstance(m, RecordingDropout)}
            opt = torch.optim.SGD(plain.parameters(), lr=0.05)
            want = []
            for t in range(steps):
                for n, m in drops.items():
                    m.feed = [logs[k][t]["masks"][n]]
                plain.zero_grad(set_to_none=True)
                s = step(plain, X(3, 4, seed=10 * k + t))
                opt.step()
                s["param"] = params(plain)
                want.append(s)
        details.append(assert_same([log["state"] for log in logs[k]], want, what=f"thread {k}"))
    return details[0]


for _mode in ("off", "correct"):
    @pattern(f"two-threads-dropout[{_mode}]", (EQUAL, CLEAR), contains=("random",),
             intent="two threads each train their own model with dropout, concurrently")
    def _(mode=_mode):
        return threads_pattern(mode)


# --------------------------------------------------------------------------------------------------
# 6. A branch whose first op works in place on its input


def inplace_first(kind: str, **options):
    def make():
        if kind == "additive":
            b = revgrad.AdditiveCoupling(mlp(2, 2, inplace_first=True), mlp(2, 2))
        else:
            b = revgrad.AffineCoupling(mlp(2, 4, inplace_first=True), scale="sigmoid")
        return [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), b.double(), Flip()]

    # No plain reference: revgrad's couplings may themselves refuse such a branch outside a chain.
    _, rev = twins(make, **options)
    loss_of(rev(X2[0].clone().requires_grad_())).backward()
    raise Mismatch("a branch starting with an in-place op ran without an error")


for _mode in ("off", "correct"):
    @pattern(f"inplace-relu-first-in-additive-f[{_mode}]", (CLEAR,), block=1, contains=(r"in[- ]place",),
             intent="nn.ReLU(inplace=True) first in f")
    def _(mode=_mode):
        inplace_first("additive", check=mode)


@pattern("inplace-relu-first-in-affine-net", (CLEAR,), block=1, contains=(r"in[- ]place",),
         intent="nn.ReLU(inplace=True) first in AffineCoupling's net")
def _():
    inplace_first("affine")


# --------------------------------------------------------------------------------------------------
# 7. Batch of 0


for _mode in MODES:
    @pattern(f"batch-0[{_mode}]", intent="x of shape [0, C]: outputs [0, ...], grads as plain autograd")
    def _(mode=_mode):
        plain, rev = twins(mixed, check=mode)
        return compare_training(plain, rev, [torch.zeros(0, 4, dtype=F64)], lr=0.05)


@pattern("batch-0-conv", intent="x of shape [0, C, H, W] through conv couplings (no BatchNorm)")
def _():
    plain, rev = twins(lambda: convs(bn=False))
    return compare_training(plain, rev, [torch.zeros(0, 4, 3, 3, dtype=F64)])


# --------------------------------------------------------------------------------------------------
# 8. torch.func


FUNC_HINT = (r"(use|instead|without|torch\.autograd|not supported)",)


def func_twins():
    plain, rev = twins(mixed)
    return plain, rev, {n: p.detach() for n, p in plain.named_parameters()}


@pattern("torch-func-grad", (EQUAL, CLEAR), contains=FUNC_HINT, intent="torch.func.grad over functional_call")
def _():
    plain, rev, p0 = func_twins()
    x = X2[0]

    def run(model):
        return torch.func.grad(lambda p, x: loss_of(torch.func.functional_call(model, p, (x,))), argnums=(0, 1))(
            {k: v.clone() for k, v in p0.items()}, x)

    return compare_usage(plain, rev, run)


@pattern("torch-func-vjp", (EQUAL, CLEAR), contains=FUNC_HINT, intent="torch.func.vjp w.r.t. the input")
def _():
    plain, rev, _ = func_twins()
    ct = (X(3, 4, seed=7), X(3, seed=8))

    def run(model):
        out, fn = torch.func.vjp(model, X2[0])
        return {"out": out, "vjp": fn(ct)}

    return compare_usage(plain, rev, run)


@pattern("torch-func-vmap", (EQUAL, CLEAR), contains=FUNC_HINT, intent="torch.func.vmap of the chain")
def _():
    plain, rev, _ = func_twins()
    xs = X(2, 3, 4, seed=3)
    return compare_usage(plain, rev, lambda model: torch.func.vmap(model)(xs))


@pattern("torch-func-per-sample-grads", (EQUAL, CLEAR), contains=FUNC_HINT,
         intent="vmap(grad(...)) per-sample gradients")
def _():
    plain, rev, p0 = func_twins()
    xs = X(3, 1, 4, seed=3)

    def run(model):
        def f(p, x):
            return loss_of(torch.func.functional_call(model, p, (x,)))

        return torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(p0, xs)

    return compare_usage(plain, rev, run)


@pattern("functional-call-backward", intent="functional_call with other parameter tensors, .backward()")
def _():
    plain, rev, p0 = func_twins()

    def run(model):
        p = {k: (v + 0.01).requires_grad_() for k, v in p0.items()}
        x = X2[0].clone().requires_grad_()
        out = torch.func.functional_call(model, p, (x,))
        loss_of(out).backward()
        return {"out": out, "x.grad": x.grad, "p.grad": {k: v.grad for k, v in p.items()}, "model": grads(model)}

    return compare_usage(plain, rev, run)


# --------------------------------------------------------------------------------------------------
# 9. Bad options


BAD_OPTIONS = [("tol", "1e-5"), ("tol", True), ("tol", -1), ("tol", float("nan")), ("anchor_every", True),
               ("anchor_every", 1.5), ("anchor_every", 0), ("graph_budget", True), ("release_after", True),
               ("check", "on")]

for _key, _value in BAD_OPTIONS:
    @pattern(f"bad-option-{_key}={_value!r}", (CLEAR,), types=(TypeError, ValueError), contains=(_key,),
             intent="refused with a TypeError/ValueError naming the option")
    def _(key=_key, value=_value):
        with seeded(0):
            blocks = additive(2)
        wrap(blocks, **{key: value})
        raise Mismatch(f"revgrad.reversible accepted {key}={value!r}")


# --------------------------------------------------------------------------------------------------
# 10. Report honesty with adaptive anchors; one message per correction


def exploding(depth: int = 12, bias: float = -14.0) -> list[nn.Module]:
    """Glow-style affine couplings whose sigmoid scales saturate near 0 (``s = sigmoid(bias + 2)``), each
    followed by a flip, as ``tests/chains.py``'s ``exploding_chain`` (a copy, so the suite does not move with
    it). With ``s = sigmoid(-12)`` every rebuilt input is off by ~1e-2 relative in float32, 1000x the
    tolerance: corrections and adaptive anchors in every step, on any hardware."""
    blocks: list[nn.Module] = []
    for _ in range(depth):
        conv = nn.Conv2d(2, 4, 3, padding=1)
        with torch.no_grad():
            conv.bias[:2] = 1.0
            conv.bias[2:] = bias
        blocks += [revgrad.AffineCoupling(conv, scale="sigmoid"), Flip()]
    return blocks


def honest(model, t):
    rep = model.last_report
    model._fuzz_events = getattr(model, "_fuzz_events", 0) + len(rep.corrected) + len(getattr(rep, "from_adaptive", []))
    from_adaptive = getattr(rep, "from_adaptive", None)
    if from_adaptive is None:
        raise Mismatch(f"step {t}: the report has no from_adaptive list")
    hidden = [i for i, e in enumerate(rep.errors)
              if not math.isnan(e) and e > rep.tol and i not in rep.corrected and i not in from_adaptive]
    if hidden:
        raise Mismatch(f"step {t}: blocks {hidden} exceed tol ({[rep.errors[i] for i in hidden]}) but are listed "
                       f"neither in corrected={rep.corrected} nor in from_adaptive={from_adaptive}")


@pattern("report-honest-with-adaptive-anchors", intent="exploding chain, check='correct', SGD steps (f32, tol 1e-4)")
def _():
    plain, rev = twins(exploding, check="correct")
    xs = [X(2, 4, 3, 3, seed=s, dtype=torch.float32) for s in range(4)]
    detail = compare_training(plain, rev, xs, tol=1e-4, lr=1e-3, after=honest)
    if not SELFTEST and not getattr(rev, "_fuzz_events", 0):
        raise ReferenceFailure("no correction and no adaptive anchor in use: the pattern tests nothing")
    return detail


@pattern("warn-once-per-correction", intent="warn=True, logging unconfigured: one line or record per correction")
def _():
    _, rev = twins(exploding, check="correct", warn=True)
    root, lg = logging.getLogger(), logging.getLogger("revgrad")
    saved = (root.handlers[:], lg.handlers[:], lg.propagate, lg.level)
    err = io.StringIO()
    corrections = 0
    try:
        root.handlers, lg.handlers, lg.propagate = [], [], True
        lg.setLevel(logging.NOTSET)
        with contextlib.redirect_stderr(err), __import__("warnings").catch_warnings(record=True) as caught:
            __import__("warnings").simplefilter("always")
            for s in range(2):
                x = X(2, 4, 3, 3, seed=s, dtype=torch.float32).requires_grad_()
                loss_of(rev(x)).backward()
                corrections += len(rev.last_report.corrected)
    finally:
        root.handlers, lg.handlers, lg.propagate = saved[0], saved[1], saved[2]
        lg.setLevel(saved[3])
    if corrections == 0 and not SELFTEST:
        raise ReferenceFailure("the exploding chain needed no correction: the pattern tests nothing")
    warned = [w for w in caught if "revgrad" in str(w.message)]
    lines = [ln for ln in err.getvalue().splitlines() if "revgrad" in ln]
    if len(warned) + len(lines) != corrections:
        raise Mismatch(f"{corrections} corrections reported as {len(warned)} warnings + {len(lines)} stderr lines")
    return f"{corrections} corrections, {len(warned)} warnings, {len(lines)} stderr lines"


@pattern("exploding-chain-gradients[correct]", intent="exploding inverses corrected: grads as plain (f32, tol 1e-4)")
def _():
    plain, rev = twins(exploding, check="correct")
    return compare_training(plain, rev, [X(2, 4, 3, 3, seed=3, dtype=torch.float32)], tol=1e-4)


# --------------------------------------------------------------------------------------------------
# 11-12. normflows flows (data-dependent ActNorm, scalar logdets), logdet shapes, FrEIA scaling


def nf_dense():
    import normflows as nf

    def net():
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))

    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    blocks = [nf.flows.ActNorm((4,)), nf.flows.MaskedAffineFlow(mask, net(), net()), nf.flows.AffineConstFlow((4,)),
              nf.flows.MaskedAffineFlow(1 - mask, net(), net()), nf.flows.ActNorm((4,))]
    return [b.double() for b in blocks]


def nf_glow():
    import normflows as nf

    blocks = [nf.flows.ActNorm((4, 1, 1)), nf.flows.Invertible1x1Conv(4), nf.flows.AffineConstFlow((4, 1, 1)),
              nf.flows.Invertible1x1Conv(4, use_lu=True), nf.flows.ActNorm((4, 1, 1)), nf.flows.Squeeze()]
    return [b.double() for b in blocks]


@pattern("normflows-actnorm-dense-training",
         intent="ActNorm data-dependent init; Adam steps: grads and params as plain")
def _():
    plain, rev = twins(nf_dense)
    xs = [X(4, 4, seed=s) * 3 + 1 for s in range(4)]
    return compare_training(plain, rev, xs, lr=0.01, adam=True)


@pattern("normflows-glow-chain-training", intent="ActNorm, 1x1 convs (plain, LU), AffineConstFlow, Squeeze; Adam")
def _():
    plain, rev = twins(nf_glow)
    xs = [X(2, 4, 2, 2, seed=s) * 2 - 1 for s in range(3)]
    return compare_training(plain, rev, xs, lr=0.01, adam=True)


for _kind in ("0dim", "1", "number"):
    @pattern(f"logdet-{_kind}", intent="a block's logdet of shape (), [1] or a number: broadcast to [B]")
    def _(kind=_kind):
        def make():
            return [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), Scale(4, kind),
                    revgrad.AffineCoupling(mlp(2, 4), "exp").double()]

        plain, rev = twins(make)
        return compare_training(plain, rev, X2, lr=0.05)


@pattern("freia-learned-elementwise-scaling", intent="FrEIA's [1]-shaped log_jac_det broadcast to [B]")
def _():
    import FrEIA.modules as Fm

    def make():
        s = Fm.LearnedElementwiseScaling([(4,)])
        with torch.no_grad():
            s.s.copy_(torch.linspace(-0.3, 0.2, 4))
        return [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), revgrad.FrEIABlock(s).double(), Flip()]

    plain, rev = twins(make)
    return compare_training(plain, rev, X2, lr=0.05)


@pattern("logdet-shape-B1", (CLEAR,), block=1, contains=("logdet",), intent="a logdet of shape [B, 1] is refused")
def _():
    _, rev = twins(lambda: [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), Scale(4, "B1")])
    loss_of(rev(X2[0].clone().requires_grad_())).backward()
    raise Mismatch("a [B, 1] logdet was accepted")


def block_catalogue():
    """(name, module, input) for every kind of module the suite uses, plus some non-blocks."""
    import FrEIA.modules as Fm
    import memcnn
    import normflows as nf

    def glow():
        return Fm.GLOWCouplingBlock([(4,)], subnet_constructor=lambda i, o: nn.Linear(i, o))

    x2, x4 = X(3, 4), X(2, 4, 2, 2)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    items = [
        ("revgrad.AdditiveCoupling", revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)), x2),
        ("revgrad.AffineCoupling", revgrad.AffineCoupling(mlp(2, 4)), x2),
        ("memcnn.AdditiveCoupling", memcnn.AdditiveCoupling(nn.Linear(2, 2), nn.Linear(2, 2)), x2),
        ("UserCoupling", UserCoupling(mlp(2, 2), mlp(2, 2)), x2),
        ("Scale", Scale(4), x2),
        ("Flip", Flip(), x2),
        ("FrEIABlock(GLOWCouplingBlock)", revgrad.FrEIABlock(glow()), x2),
        ("FrEIABlock(LearnedElementwiseScaling)", revgrad.FrEIABlock(Fm.LearnedElementwiseScaling([(4,)])), x2),
        ("nf.ActNorm", nf.flows.ActNorm((4,)), x2),
        ("nf.AffineConstFlow", nf.flows.AffineConstFlow((4,)), x2),
        ("nf.MaskedAffineFlow", nf.flows.MaskedAffineFlow(mask, nn.Linear(4, 4), nn.Linear(4, 4)), x2),
        ("nf.Invertible1x1Conv", nf.flows.Invertible1x1Conv(4), x4),
        ("nf.Squeeze", nf.flows.Squeeze(), x4),
        ("nn.Linear", nn.Linear(4, 4), x2),
        ("nn.Sequential(blocks)", nn.Sequential(Flip(), Flip()), x2),
        ("FrEIA GLOWCouplingBlock (unwrapped)", glow(), x2),
    ]
    return [(n, m.double(), x) for n, m, x in items]


@pattern("is-block-agrees-with-chain", intent="revgrad.is_block(m) is True exactly for modules a chain accepts")
def _():
    with seeded(0):
        items = block_catalogue()
    disagree = []
    for name, module, x in items:
        try:
            model = revgrad.reversible([module])
            loss_of(model(x.clone().requires_grad_())).backward()
            accepted = True
        except Exception:
            accepted = False
        if revgrad.is_block(module) != accepted:
            disagree.append(f"{name} (is_block={revgrad.is_block(module)}, accepted={accepted})")
    if disagree:
        raise Mismatch("; ".join(disagree))
    return f"{len(items)} modules agree"


# --------------------------------------------------------------------------------------------------
# 13-14. FrEIA: autograd inside forward; errors name the wrapped module


@pattern("freia-iresnet-autograd-in-forward", (EQUAL, CLEAR), block=1, contains=("IResNetLayer",),
         intent="IResNetLayer computes its logdet with autograd.grad inside forward")
def _():
    import FrEIA.modules as Fm

    def make():
        layer = Fm.IResNetLayer([(4,)], internal_size=8, jacobian_iterations=3, fixed_point_iterations=80,
                                spectral_norm_max=0.5)
        layer.lipschitz_correction()
        return [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), revgrad.FrEIABlock(layer).double(),
                revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double()]

    plain, rev = twins(make)
    return compare_training(plain, rev, X2, lr=0.05)


def freia_glow_chain():
    import FrEIA.modules as Fm

    def sub(i, o):
        return nn.Sequential(nn.Linear(i, 8), nn.Tanh(), nn.Linear(8, o))

    return [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(),
            revgrad.FrEIABlock(Fm.GLOWCouplingBlock([(4,)], subnet_constructor=sub, clamp=2.0)).double(),
            revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double()]


def break_inverse(freia_block: nn.Module) -> None:
    """Make the wrapped FrEIA module's inverse off by 1 % (its class name stays GLOWCouplingBlock)."""
    module = freia_block.module
    original = type(module).forward

    def forward(self, x, c=[], rev=False, jac=True):  # noqa: B006
        out, j = original(self, x, c, rev, jac)
        return ([out[0] * 1.01] if rev else out), j

    module.forward = types.MethodType(forward, module)


@pattern("freia-broken-inverse[detect]", (CLEAR,), block=1, contains=(r"block 1 \(FrEIABlock: GLOWCouplingBlock\)",),
         intent="the error names the wrapped FrEIA class")
def _():
    _, rev = twins(freia_glow_chain, check="detect")
    break_inverse(rev[1])
    loss_of(rev(X2[0].clone().requires_grad_())).backward()
    raise Mismatch("a 1 % inverse error passed check='detect'")


@pattern("freia-broken-inverse[correct]", intent="check='correct' recomputes the broken FrEIA inverse from anchors")
def _():
    plain, rev = twins(freia_glow_chain, check="correct", anchor_every=2)
    break_inverse(rev[1])
    return compare_training(plain, rev, X2, lr=0.05)


# --------------------------------------------------------------------------------------------------
# Hostile usage: graphs


for _mode in ("off", "correct"):
    @pattern(f"chain-called-twice-in-one-graph[{_mode}]", intent="model(model(x)), BatchNorm in training mode")
    def _(mode=_mode):
        plain, rev = twins(lambda: additive(4, bn=True), check=mode)
        return compare_usage(plain, rev, twice)


def twice(model):
    x = X4[0].clone().requires_grad_()
    out = model(model(x))
    loss_of(out).backward()
    return {"out": out, "x.grad": x.grad, "grad": grads(model), "buf": dict(model.named_buffers()),
            "rng": torch.get_rng_state()}


@pattern("chain-called-twice-in-one-graph-dropout", intent="model(model(x)) with BatchNorm and dropout")
def _():
    plain, rev = twins(lambda: additive(4, bn=True, dropout=0.2))
    return compare_usage(plain, rev, twice)


@pattern("two-forwards-one-backward", intent="two forwards (different inputs, BN, dropout), one backward of the sum")
def _():
    plain, rev = twins(lambda: mixed(bn=True, dropout=0.2))

    def usage(model):
        a, b = X4[0].clone().requires_grad_(), X4[1].clone().requires_grad_()
        out_a, out_b = model(a), model(b)
        (loss_of(out_a) + 2 * loss_of(out_b)).backward()
        return {"a": out_a, "b": out_b, "a.grad": a.grad, "b.grad": b.grad, "grad": grads(model),
                "buf": dict(model.named_buffers()), "rng": torch.get_rng_state()}

    return compare_usage(plain, rev, usage)


@pattern("two-forwards-backward-in-reverse-order", intent="forward a, forward b, backward b, backward a")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.2))

    def usage(model):
        a, b = X2[0].clone().requires_grad_(), X2[1].clone().requires_grad_()
        out_a, out_b = model(a), model(b)
        loss_of(out_b).backward()
        gb = grads(model)
        loss_of(out_a).backward()
        return {"a.grad": a.grad, "b.grad": b.grad, "after_b": gb, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("retain-graph-backward-twice", intent="backward(retain_graph=True) twice: gradients accumulate")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.2))

    def usage(model):
        x = X2[0].clone().requires_grad_()
        loss = loss_of(model(x))
        loss.backward(retain_graph=True)
        first = grads(model)
        loss.backward()
        return {"first": first, "x.grad": x.grad, "grad": grads(model), "rng": torch.get_rng_state()}

    return compare_usage(plain, rev, usage)


@pattern("grad-accumulation-micro-batches", intent="two forward/backward pairs, then one SGD step")
def _():
    plain, rev = twins(lambda: mixed(bn=True))

    def usage(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x in X4:
            loss_of(model(x.clone().requires_grad_())).backward()
        g = grads(model)
        opt.step()
        return {"grad": g, "param": params(model), "buf": dict(model.named_buffers())}

    return compare_usage(plain, rev, usage)


@pattern("autograd-grad-input-only", intent="torch.autograd.grad(loss, x): params' .grad stay None")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        (gx,) = torch.autograd.grad(loss_of(model(x)), x)
        return {"gx": gx, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("autograd-grad-params-only", intent="torch.autograd.grad(loss, params), x requiring grad")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        names, ps = zip(*model.named_parameters())
        g = torch.autograd.grad(loss_of(model(x)), ps)
        return {"g": dict(zip(names, g)), "x.grad": x.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("backward-inputs-subset", intent="loss.backward(inputs=[x, one parameter])")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        loss_of(model(x)).backward(inputs=[x, model[2].g[0].weight])
        return {"x.grad": x.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("vjp-with-grad-outputs", intent="torch.autograd.grad((y, logdet), [x, *params], grad_outputs)")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        y, ld = model(x)
        ps = list(model.parameters())
        g = torch.autograd.grad((y, ld), [x, *ps], (X(3, 4, seed=5), X(3, seed=6)))
        return {"g": g}

    return compare_usage(plain, rev, usage)


@pattern("loss-on-logdet-only", intent="the loss uses only the logdet")
def _():
    plain, rev = twins(mixed)
    weights = torch.arange(1.0, 4.0, dtype=F64)
    return compare_training(plain, rev, X2, lr=0.05, loss=lambda out: (out[1] * weights).sum())


@pattern("loss-ignores-logdet", intent="the loss uses only y")
def _():
    plain, rev = twins(mixed)
    return compare_training(plain, rev, X2, lr=0.05, loss=lambda out: loss_of(out[0]))


@pattern("loss-on-output-slice", intent="the loss uses part of y (zero gradient elsewhere)")
def _():
    plain, rev = twins(mixed)
    return compare_training(plain, rev, X2, lr=0.05, loss=lambda out: loss_of(out[0][:, 1:3]))


@pattern("output-tensor-hook", intent="y.register_hook scaling its gradient")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        y, ld = model(x)
        y.register_hook(lambda g: g * 3.0)
        loss_of((y, ld)).backward()
        return {"x.grad": x.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("x-used-twice", intent="x feeds the chain and the loss directly")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        (loss_of(model(x)) + (x ** 3).sum()).backward()
        return {"x.grad": x.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("non-leaf-input", intent="x = 2 * leaf + 1: gradient reaches the leaf")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        leaf = X2[0].clone().requires_grad_()
        loss_of(model(2 * leaf + 1)).backward()
        return {"leaf.grad": leaf.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("anomaly-mode", intent="under torch.autograd.detect_anomaly()")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        with torch.autograd.detect_anomaly(check_nan=True):
            return step(model, X2[0])

    return compare_usage(plain, rev, usage)


@pattern("create-graph-backward", (CLEAR,), contains=("create_graph",), intent="backward(create_graph=True)")
def _():
    _, rev = twins(mixed)
    loss_of(rev(X2[0].clone().requires_grad_())).backward(create_graph=True)
    raise Mismatch("create_graph=True ran (double backward is not supported)")


@pattern("autograd-grad-create-graph", (CLEAR,), contains=("create_graph",),
         intent="torch.autograd.grad(..., create_graph=True)")
def _():
    _, rev = twins(mixed)
    x = X2[0].clone().requires_grad_()
    torch.autograd.grad(loss_of(rev(x)), x, create_graph=True)
    raise Mismatch("create_graph=True ran (double backward is not supported)")


for _reentrant in (False, True):
    @pattern(f"checkpoint-around-chain[reentrant={_reentrant}]", intent="torch.utils.checkpoint around the chain")
    def _(reentrant=_reentrant):
        plain, rev = twins(lambda: mixed(dropout=0.2))

        def usage(model):
            x = X2[0].clone().requires_grad_()
            out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)
            loss_of(out).backward()
            return {"out": out, "x.grad": x.grad, "grad": grads(model), "rng": torch.get_rng_state()}

        return compare_usage(plain, rev, usage)


@pattern("backward-inside-no-grad", intent="loss.backward() called inside torch.no_grad()")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.2))

    def usage(model):
        x = X2[0].clone().requires_grad_()
        loss = loss_of(model(x))
        with torch.no_grad():
            loss.backward()
        return {"x.grad": x.grad, "grad": grads(model), "rng": torch.get_rng_state()}

    return compare_usage(plain, rev, usage)


@pattern("backward-in-another-thread", intent="forward in the main thread, backward in a new thread (dropout)")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.3))

    def usage(model):
        x = X2[0].clone().requires_grad_()
        loss = loss_of(model(x))
        failed: list[BaseException] = []

        def run():
            try:
                loss.backward()
            except BaseException as e:
                failed.append(e)

        th = threading.Thread(target=run)
        th.start()
        th.join()
        if failed:
            raise failed[0]
        return {"x.grad": x.grad, "grad": grads(model), "rng": torch.get_rng_state()}

    return compare_usage(plain, rev, usage)


@pattern("retain-grad-on-output", intent="y.retain_grad(): y.grad as plain")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        y, ld = model(x)
        y.retain_grad()
        ld.retain_grad()
        loss_of((y, ld)).backward()
        return {"y.grad": y.grad, "ld.grad": ld.grad, "x.grad": x.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


# --------------------------------------------------------------------------------------------------
# Hostile usage: what requires grad, frozen and shared parameters


class WithSpare(UserCoupling):
    """A user coupling holding a parameter its forward never uses."""

    def __init__(self, f, g) -> None:
        super().__init__(f, g)
        self.spare = nn.Linear(2, 2)


@pattern("unused-parameter", intent="a block parameter forward never uses: .grad stays None")
def _():
    plain, rev = twins(lambda: [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(),
                                WithSpare(mlp(2, 2), mlp(2, 2)).double(), Scale(4)])
    return compare_training(plain, rev, X2, lr=0.05)


@pattern("dtype-cast-after-wrap", intent="float32 blocks wrapped, then model.double()")
def _():
    plain, rev = twins(lambda: mixed(dtype=torch.float32))
    plain.double(), rev.double()
    return compare_training(plain, rev, X2, lr=0.05)


@pattern("frozen-some-params", intent="requires_grad=False on one block and one layer")
def _():
    plain, rev = twins(mixed)
    for m in (plain, rev):
        m[1].requires_grad_(False)
        m[5].g[0].weight.requires_grad_(False)
    return compare_training(plain, rev, X2, lr=0.05)


@pattern("all-params-frozen", intent="every parameter frozen, x requires grad")
def _():
    plain, rev = twins(mixed)
    plain.requires_grad_(False), rev.requires_grad_(False)
    return compare_training(plain, rev, X2)


@pattern("x-not-requiring-grad", intent="x does not require grad: parameter gradients only")
def _():
    plain, rev = twins(mixed)
    return compare_training(plain, rev, X2, lr=0.05, x_grad=False)


@pattern("nothing-requires-grad", intent="frozen params, x without grad: output without graph")
def _():
    plain, rev = twins(mixed)
    plain.requires_grad_(False), rev.requires_grad_(False)

    def usage(model):
        y, ld = model(X2[0])
        return {"y": y, "ld": ld, "requires_grad": str(y.requires_grad)}

    return compare_usage(plain, rev, usage)


@pattern("shared-layer-two-blocks", intent="one nn.Linear inside f of block 0 and g of block 2")
def _():
    def make():
        shared = nn.Linear(6, 2)
        f = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), shared)
        g = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), shared)
        blocks = [revgrad.AdditiveCoupling(f, mlp(2, 2)), Flip(), revgrad.AdditiveCoupling(mlp(2, 2), g), Scale(4)]
        return [b.double() for b in blocks]

    plain, rev = twins(make)
    return compare_training(plain, rev, X2, lr=0.05)


@pattern("param-hooks-fire-once", intent="tensor hooks on every parameter: called once, with plain's gradient")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        seen: dict[str, list] = {}
        handles = []
        for n, p in model.named_parameters():
            def hook(g, n=n):
                seen.setdefault(n, []).append(g.detach().clone())
                return g * 2.0

            handles.append(p.register_hook(hook))
        s = step(model, X2[0])
        for h in handles:
            h.remove()
        return {"step": s, "calls": {n: len(v) for n, v in seen.items()}, "seen": seen}

    return compare_usage(plain, rev, usage)


@pattern("block-module-hooks", intent="forward and full backward hooks on a block (forward hook: first call compared)")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        fwd, bwd = [], []
        h1 = model[1].register_forward_hook(lambda m, i, o: fwd.append(detached(o)))
        h2 = model[1].register_full_backward_hook(lambda m, gi, go: bwd.append(detached((gi, go))))
        try:
            s = step(model, X2[0])
        finally:
            h1.remove(), h2.remove()
        return {"step": s, "fwd_first": fwd[0] if fwd else None, "bwd": bwd}

    return compare_usage(plain, rev, usage)


@pattern("global-module-forward-hook", intent="register_module_forward_hook for every module")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            return step(model, X2[0])
        finally:
            handle.remove()

    return compare_usage(plain, rev, usage)


@pattern("buffer-written-in-forward", intent="a block counting its calls in a buffer: once per forward")
def _():
    plain, rev = twins(lambda: [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), Shift(4),
                                UserCoupling(mlp(2, 2), mlp(2, 2)).double(), Shift(4)])
    return compare_training(plain, rev, X2, lr=0.05)


# --------------------------------------------------------------------------------------------------
# Hostile usage: grad modes, precision, layouts, dtypes


@pattern("no-grad-forward", intent="torch.no_grad(): outputs as plain, no graph")
def _():
    plain, rev = twins(lambda: mixed(bn=True))

    def usage(model):
        with torch.no_grad():
            y, ld = model(X4[0].clone().requires_grad_())
        return {"y": y, "ld": ld, "graph": str(y.requires_grad), "buf": dict(model.named_buffers())}

    return compare_usage(plain, rev, usage)


@pattern("inference-mode-forward", intent="torch.inference_mode(): outputs as plain")
def _():
    plain, rev = twins(lambda: mixed(bn=True))

    def usage(model):
        with torch.inference_mode():
            y, ld = model(X4[0])
            return {"y": y.clone(), "ld": ld.clone(), "inference": str(y.is_inference())}

    return compare_usage(plain, rev, usage)


@pattern("autocast-bf16-cpu", intent="torch.autocast('cpu', bfloat16) vs plain under the same autocast (tol 3e-2)")
def _():
    def make():
        return [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)), revgrad.AffineCoupling(mlp(2, 4), "bounded"),
                UserCoupling(mlp(2, 2), mlp(2, 2)), revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2))]

    plain, rev = twins(make)

    def usage(model):
        x = X(4, 4, seed=1, dtype=torch.float32).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss_of(out).backward()
        return {"y": out[0].float(), "ld": out[1].float(), "x.grad": x.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage, tol=3e-2)


@pattern("non-contiguous-input", intent="x = a strided slice (conv chain)")
def _():
    plain, rev = twins(convs)
    big = X(2, 4, 3, 6, seed=1)
    return compare_training(plain, rev, [big[:, :, :, ::2]], lr=0.05)


@pattern("channels-last-input", intent="x in channels_last memory format (conv chain)")
def _():
    plain, rev = twins(convs)

    def usage(model):
        x = XC[0].to(memory_format=torch.channels_last).requires_grad_()
        out = model(x)
        loss_of(out).backward()
        return {"out": out, "x.grad": x.grad, "grad": grads(model), "buf": dict(model.named_buffers())}

    return compare_usage(plain, rev, usage)


@pattern("expanded-input", intent="x = base.expand(B, C): stride 0, overlapping memory")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        base = X(1, 4, seed=1).requires_grad_()
        out = model(base.expand(3, 4))
        loss_of(out).backward()
        return {"out": out, "base.grad": base.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("batch-1", intent="a batch of one sample")
def _():
    plain, rev = twins(mixed)
    return compare_training(plain, rev, [X(1, 4, seed=1), X(1, 4, seed=2)], lr=0.05)


@pattern("dtype-changing-block", intent="a block mapping float32 to float64 inside a chain (tol 1e-5)")
def _():
    def make():
        return [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).float(), ToDouble(4),
                revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double()]

    plain, rev = twins(make)
    return compare_training(plain, rev, [X(3, 4, dtype=torch.float32)], tol=1e-5, lr=0.05)


@pattern("dtype-mismatch-input", (EQUAL, CLEAR), intent="float32 x into float64 blocks: the same error as plain")
def _():
    plain, rev = twins(mixed)
    x = X(3, 4, dtype=torch.float32).requires_grad_()
    with reference():
        try:
            plain(x)
        except RuntimeError as e:
            want = str(e)
        else:
            raise ReferenceFailure("plain autograd accepted a float32 input to float64 blocks")
    try:
        loss_of(rev(x)).backward()
    except RuntimeError as e:
        if str(e) == want:
            return f"both raise: {want[:60]}"
        raise
    raise Mismatch("revgrad ran where plain autograd raises")


for _mode in ("off", "correct"):
    @pattern(f"input-modified-in-place-after-forward[{_mode}]", (EQUAL, CLEAR),
             torch_clear=r"modified by an inplace operation",
             intent="x.mul_(2) after forward: forward's gradients, or autograd's refusal")
    def _(mode=_mode):
        plain, rev = twins(mixed, check=mode)

        def usage(model, modify):
            leaf = X2[0].clone().requires_grad_()
            x = leaf * 1.0
            out = model(x)
            if modify:
                with torch.no_grad():
                    x.mul_(2.0)
            loss_of(out).backward()
            return {"out": out, "leaf.grad": leaf.grad, "grad": grads(model)}

        with reference():
            want = detached(usage(plain, False))
        return assert_same(detached(usage(rev, True)), want)


@pattern("output-modified-in-place-before-loss", (EQUAL, CLEAR), torch_clear=r"modified by an inplace operation",
         intent="y.mul_(2) with grad before the loss: plain autograd differentiates through it")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        x = X2[0].clone().requires_grad_()
        y, ld = model(x)
        y.mul_(2.0)
        loss_of((y, ld)).backward()
        return {"x.grad": x.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


# --------------------------------------------------------------------------------------------------
# Hostile usage: models, options, inverse, copies


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.body = nn.Sequential(
            revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)), UserCoupling(mlp(2, 2), mlp(2, 2)),
            nn.Linear(4, 4), nn.Tanh(), nn.BatchNorm1d(4),  # Tanh first: no shift-invariant bias before BN
            revgrad.AdditiveCoupling(mlp(2, 2, dropout=0.2), mlp(2, 2)), Flip(),
            revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)),
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@pattern("chain-in-larger-model", intent="reversible(model) converts runs in place; non-block layers between runs")
def _():
    with seeded(0):
        net = Big().double()
    plain = copy.deepcopy(net)
    rev = wrap(net)
    if not SELFTEST and type(rev.body) is nn.Sequential:
        raise Mismatch("the body was not converted")
    return compare_training(plain, rev, [X(4, 3, seed=1), X(4, 3, seed=2)], lr=0.05, rng=True)


@pattern("nested-reversible-in-chain", intent="a ReversibleSequential as a child of a chain of blocks")
def _():
    with seeded(0):
        blocks = additive(4)
    plain = PlainChain(*copy.deepcopy(blocks[:1]), PlainChain(*copy.deepcopy(blocks[1:3])),
                       *copy.deepcopy(blocks[3:]))
    rev = wrap(nn.Sequential(blocks[0], wrap(blocks[1:3]), *blocks[3:]))
    return compare_training(plain, rev, X2, lr=0.05)


@pattern("chain-slice", intent="model[1:4] runs like the plain slice")
def _():
    plain, rev = twins(mixed)
    return compare_training(plain[1:4], rev[1:4], X2, lr=0.05)


@pattern("model-inverse-vs-plain-inverse", intent="model.inverse(y) and its gradients vs the plain inverse")
def _():
    plain, rev = twins(mixed)

    def usage(model):
        y = X2[0].clone().requires_grad_()
        x = model.inverse(y)
        x = x[0] if isinstance(x, tuple) else x
        loss_of(x).backward()
        return {"x": x, "y.grad": y.grad, "grad": grads(model)}

    return compare_usage(plain, rev, usage)


@pattern("model-inverse-dropout-train", intent="model.inverse(y) in training mode with dropout, and its gradients")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.3))

    def usage(model):
        y = X2[0].clone().requires_grad_()
        x = model.inverse(y)
        loss_of(x).backward()
        return {"x": x, "y.grad": y.grad, "grad": grads(model), "rng": torch.get_rng_state()}

    return compare_usage(plain, rev, usage)


@pattern("deepcopy-and-state-dict-after-step", intent="after a step: deepcopy, and load_state_dict into a fresh chain")
def _():
    with seeded(0):
        blocks = mixed(bn=True)
    with seeded(5):
        fresh_blocks = mixed(bn=True)
    plain = PlainChain(*copy.deepcopy(blocks))
    rev = wrap(nn.Sequential(*blocks))
    fresh_plain = PlainChain(*copy.deepcopy(fresh_blocks))
    fresh_rev = wrap(nn.Sequential(*fresh_blocks))

    def usage(model, fresh):
        first = train(model, [X4[0]], lr=0.05)
        copied = copy.deepcopy(model)
        fresh.load_state_dict(model.state_dict())
        return {"first": first, "copied": train(copied, [X4[1]], lr=0.05),
                "loaded": train(fresh, [X4[1]], lr=0.05), "keys": ",".join(model.state_dict())}

    with reference():
        want = detached(usage(plain, fresh_plain))
    return assert_same(detached(usage(rev, fresh_rev)), want)


@pattern("graph-budget", intent="graph_budget > 0: three steps equal, top blocks kept from the second")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.2, bn=True), graph_budget=1 << 20)
    xs = [X(4, 4, seed=s) for s in range(3)]
    detail = compare_training(plain, rev, xs, lr=0.05, rng=True)
    if not SELFTEST and not rev.kept_blocks:
        raise Mismatch("graph_budget=1 MiB kept no block")
    return detail


@pattern("anchor-every-1", intent="anchor_every=1, check='correct'")
def _():
    plain, rev = twins(lambda: mixed(dropout=0.2), anchor_every=1)
    return compare_training(plain, rev, X2, lr=0.05, rng=True)


for _mode in ("off", "correct"):
    @pattern(f"caller-rng-preserved[{_mode}]", intent="the caller draws between forward and backward; RNG state after")
    def _(mode=_mode):
        plain, rev = twins(lambda: mixed(dropout=0.3), check=mode)
        return compare_training(plain, rev, X2, lr=0.05, rng=True, between=lambda m: torch.rand(3))


@pattern("non-block-in-list", (CLEAR,), types=(TypeError,), contains=("not a block", r"\b1\b"),
         intent="reversible([block, nn.Linear]) is refused naming item 1")
def _():
    wrap([revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)), nn.Linear(4, 4)])
    raise Mismatch("a list holding nn.Linear was accepted")


@pattern("inverse-of-wrong-shape", (CLEAR,), block=1, contains=("shape",),
         intent="a block whose inverse drops a channel is refused in backward")
def _():
    _, rev = twins(lambda: [revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double(), BadInverseShape(4),
                            revgrad.AdditiveCoupling(mlp(2, 2), mlp(2, 2)).double()], anchor_every=2)
    loss_of(rev(X2[0].clone().requires_grad_())).backward()
    raise Mismatch("an inverse of the wrong shape was accepted")


# --------------------------------------------------------------------------------------------------
# The tests


_CACHE: dict[str, Result] = {}


def result_of(name: str) -> Result:
    if name not in _CACHE:
        _CACHE[name] = run_pattern(PATTERNS[name])
    return _CACHE[name]


@pytest.mark.parametrize("name", list(PATTERNS), ids=list(PATTERNS))
def test_pattern(name):
    p = PATTERNS[name]
    r = result_of(name)
    if r.outcome == SKIPPED:
        pytest.skip(r.detail)
    assert r.outcome != TEST_BUG, f"{name}: the plain-autograd reference failed: {r.detail}"
    assert r.allowed, f"{name}: {r.outcome} ({r.detail}); intended {' | '.join(p.allowed)} ({p.intent})"


def test_summary():
    results = [result_of(name) for name in PATTERNS]
    text = table(results, PATTERNS)
    print("\n" + text)
    bad = [r for r in results if r.outcome in (SILENT, CRASH, TEST_BUG)]
    assert len(PATTERNS) >= 60
    assert not bad, f"{len(bad)} patterns silently wrong, crashing or broken:\n{text}"
