"""Ordinary usage that must end as "equal to plain autograd" or "a clear error", never silently wrong.

One section per kind of misuse or unusual block: reused blocks, state changed between forward and
backward, training modes, random numbers (sub-networks replayed in another order, threads), in-place
sub-networks, empty batches, torch.func, option types, report honesty, data-dependent initialisation,
log-determinant shapes, autograd inside a block's forward, and error messages that name the block.
The broad usage-fuzz suite (``tests/test_usage_fuzz.py``) runs many more patterns the same way.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import TOL, assert_rel_close, plain_chain, scalar_loss
from torch import nn

import revgrad
from revgrad.engine.replay import RandomReplayError

DT = torch.float64
CHECKS = ["off", "detect", "correct"]


def _linear(i: int, o: int) -> nn.Module:
    return nn.Linear(i, o, dtype=DT)


def _mlp(c: int, p: float = 0.0, bn: bool = False) -> nn.Module:
    layers: list[nn.Module] = [_linear(c, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8, dtype=DT))
    layers += [nn.Tanh(), nn.Dropout(p), _linear(8, c)] if p else [nn.Tanh(), _linear(8, c)]
    return nn.Sequential(*layers)


def _run(model_or_blocks, x: torch.Tensor, seed: int | None = None, between=None, params=None):
    """One step (forward, optional ``between(model)``, backward): output, input grad, param grads.

    ``model_or_blocks``: a module, a list of blocks (run with plain autograd) or a function of ``x``
    (then ``params`` lists its parameters)."""
    xx = x.detach().clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    run = model_or_blocks
    out = plain_chain(run, xx) if isinstance(run, list) else run(xx)
    if between is not None:
        between(model_or_blocks)
    scalar_loss(out).backward()
    y = out if isinstance(out, torch.Tensor) else out[0]
    return y.detach(), xx.grad, [p.grad for p in (params if params is not None else _params(model_or_blocks))]


def _params(m):
    return list(nn.ModuleList(m).parameters()) if isinstance(m, list) else list(m.parameters())


def _broadcasting(blocks):
    """Plain autograd over ``blocks``, broadcasting a log-determinant of one number to ``[B]``."""

    def run(h):
        total = None
        for b in blocks:
            out = b(h)
            h, ld = out if isinstance(out, tuple) else (out, None)
            if ld is not None:
                ld = torch.as_tensor(ld, dtype=h.dtype)
                ld = ld.reshape(()).expand(h.shape[0]) if ld.numel() == 1 else ld
                total = ld if total is None else total + ld
        return h if total is None else (h, total)

    return run


def _assert_same(got, ref, tol: float = TOL[DT]) -> None:
    (y, gx, gps), (y0, gx0, gps0) = got, ref
    assert_rel_close(y, y0, tol, "output")
    assert_rel_close(gx, gx0, tol, "input gradient")
    assert len(gps) == len(gps0)
    flat = torch.cat([g.flatten() for g in gps if g is not None])
    flat0 = torch.cat([g.flatten() for g in gps0 if g is not None])
    assert_rel_close(flat, flat0, tol, "parameter gradients")


# -- the same block object twice --------------------------------------------------------------------


def test_same_block_twice_runs_every_occurrence():
    torch.manual_seed(0)
    b = revgrad.AdditiveCoupling(_mlp(2), _mlp(2))
    c = revgrad.AffineCoupling(_mlp(2, 0)[0:1].append(_linear(8, 4)), scale="exp")
    seq = nn.Sequential(b, c, b)
    plain = copy.deepcopy(seq)
    x = torch.randn(3, 4, dtype=DT)
    for check in CHECKS:
        model = revgrad.reversible(copy.deepcopy(seq), check=check)
        assert len(model) == 3
        ref = _run(list(plain), x)
        _assert_same(_run(model, x), ref)
        for p in plain.parameters():
            p.grad = None


def test_same_block_twice_inside_a_model_converted_in_place():
    torch.manual_seed(0)
    b = revgrad.AdditiveCoupling(_mlp(2), _mlp(2))
    net = nn.Sequential(_linear(4, 4), nn.Sequential(b, revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), b))
    plain = copy.deepcopy(net)
    model = revgrad.reversible(copy.deepcopy(net))
    x = torch.randn(3, 4, dtype=DT)
    _assert_same(_run(model, x), _run(plain, x))
    assert len(model[1].last_report.errors) == 3


# -- state changed between forward and backward ----------------------------------------------------


def _bn_chain(check: str = "correct") -> nn.Module:
    torch.manual_seed(0)
    blocks = [revgrad.AdditiveCoupling(_mlp(2, bn=True), _mlp(2, bn=True)) for _ in range(3)]
    return revgrad.reversible(blocks, check=check)


@pytest.mark.parametrize("check", CHECKS)
def test_parameter_changed_in_place_before_backward_is_refused(check):
    model = _bn_chain(check)
    x = torch.randn(4, 4, dtype=DT, requires_grad=True)
    y = model(x)
    with torch.no_grad():
        model[1].g[0].weight.add_(0.1)
    with pytest.raises(revgrad.BlockError, match=r"block 1 \(AdditiveCoupling\).*'g\.0\.weight'.*in place"):
        y.sum().backward()


def test_optimizer_step_between_forward_and_backward_is_refused():
    model = _bn_chain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 4, dtype=DT)
    model(x).sum().backward()
    y = model(x)
    opt.step()
    with pytest.raises(revgrad.BlockError, match=r"block 0 \(AdditiveCoupling\).*was modified in place"):
        y.sum().backward()


def test_read_only_buffer_changed_in_place_before_backward_is_refused():
    model = _bn_chain().eval()  # BatchNorm reads its running statistics
    y = model(torch.randn(4, 4, dtype=DT, requires_grad=True))
    with torch.no_grad():
        model[2].f[1].running_mean.add_(1.0)
    with pytest.raises(revgrad.BlockError, match=r"block 2 \(AdditiveCoupling\).*'f\.1\.running_mean'"):
        y.sum().backward()


class _InitOnInverse(nn.Module):
    """A block whose inverse writes its parameter (as a data-dependent init would): backward refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(4, dtype=DT))

    def forward(self, x):
        return x * self.s

    def inverse(self, y):
        with torch.no_grad():
            self.s.mul_(1.0)
        return y / self.s


def test_backward_never_changes_a_parameter():
    blocks = [_InitOnInverse(), revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), _InitOnInverse()]
    model = revgrad.reversible(blocks, check="off")
    y = model(torch.randn(3, 4, dtype=DT, requires_grad=True))
    with pytest.raises(revgrad.BlockError, match=r"block 2 \(_InitOnInverse\).*'s'.*by backward"):
        y.sum().backward()


# -- training modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["off", "correct"])
@pytest.mark.parametrize("switch", ["train-then-eval", "eval-then-train"])
def test_mode_changed_between_forward_and_backward(check, switch):
    model = _bn_chain(check)
    plain = copy.deepcopy(list(model))
    first, second = ("train", "eval") if switch == "train-then-eval" else ("eval", "train")
    for m in (model, *plain):
        getattr(m, first)()
    x = torch.randn(4, 4, dtype=DT)

    def flip(m):
        for mod in m if isinstance(m, list) else [m]:
            getattr(mod, second)()

    got = _run(model, x, between=flip)
    ref = _run(plain, x, between=flip)
    _assert_same(got, ref)
    for b, b0 in zip(model.buffers(), nn.ModuleList(plain).buffers()):
        assert torch.equal(b, b0), "backward moved BatchNorm statistics"


# -- random numbers --------------------------------------------------------------------------------


class _TwoStep(nn.Module):
    """A user's coupling whose inverse runs g before f (the opposite of forward), dropout in both."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.f, self.g = (_mlp(2), _mlp(2)) if functional else (_mlp(2, 0.3), _mlp(2, 0.3))

    def _branch(self, net, h):
        return F.dropout(net(h), 0.3, self.training) if self.functional else net(h)

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        y1 = x1 + self._branch(self.f, x2)
        return torch.cat([y1, x2 + self._branch(self.g, y1)], 1)

    def inverse(self, y):
        y1, y2 = y.chunk(2, 1)
        x2 = y2 - self._branch(self.g, y1)
        return torch.cat([y1 - self._branch(self.f, x2), x2], 1)


def _memcnn_blocks():
    memcnn = pytest.importorskip("memcnn")
    return [memcnn.AdditiveCoupling(_mlp(2, 0.3), _mlp(2, 0.3)) for _ in range(3)]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # memcnn's custom_fwd
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("kind", ["memcnn", "two-step"])
def test_inverse_calling_random_subnetworks_in_reverse_order_is_exact(kind, check):
    torch.manual_seed(0)
    blocks = _memcnn_blocks() if kind == "memcnn" else [_TwoStep() for _ in range(3)]
    plain = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, check=check)
    x = torch.randn(5, 4, dtype=DT)
    for _ in range(2):
        _assert_same(_run(model, x, seed=7), _run(plain, x, seed=7))
        if check != "off":
            assert model.last_report.corrected == [], "the inverse was replayed with other random numbers"


def test_randomness_outside_submodule_calls_keeps_the_input():
    """F.dropout in the block's own code cannot be keyed by module: revgrad stores that input."""
    torch.manual_seed(0)
    blocks = [_TwoStep(functional=True) for _ in range(3)]
    plain = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, check="off")
    x = torch.randn(5, 4, dtype=DT)
    with pytest.warns(RuntimeWarning, match="outside their sub-modules' calls"):
        got = _run(model, x, seed=3)
    _assert_same(got, _run(plain, x, seed=3))
    assert model.last_report.anchors == [0, 1, 2]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_block_turning_random_after_eval_is_exact():
    """A block seen deterministic (eval) is not recorded; when it draws again, that step is still exact."""
    torch.manual_seed(0)
    blocks = _memcnn_blocks()
    plain = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, check="off")
    x = torch.randn(5, 4, dtype=DT)
    for mode in ("eval", "train", "train"):
        for m in (model, *plain):
            getattr(m, mode)()
        _assert_same(_run(model, x, seed=11), _run(plain, x, seed=11))


class _DrawsOnlyInForward(nn.Module):
    """Draws one extra number only on its first call: what another thread drawing from the same
    generator while the block runs looks like to the replay."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        if self.calls == 1:
            torch.rand(1)
        return self.drop(h)


@pytest.mark.parametrize("check", CHECKS)
def test_random_numbers_that_cannot_be_replayed_raise(check):
    torch.manual_seed(0)
    block = revgrad.AdditiveCoupling(nn.Sequential(_linear(2, 2), _DrawsOnlyInForward()), _mlp(2))
    model = revgrad.reversible([revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), block], check=check, anchor_every=5)
    y = model(torch.randn(3, 4, dtype=DT, requires_grad=True))
    with pytest.raises(RandomReplayError, match=r"block 1 \(AdditiveCoupling\) drew random numbers"):
        y.sum().backward()


class _SpyDropout(nn.Module):
    """Dropout that records the masks of forward calls, or applies given ones (the plain reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []
        self.given: list[torch.Tensor] | None = None

    def forward(self, h):
        if self.given is not None:
            return h * self.given.pop(0)
        mask = (torch.rand_like(h) > 0.3).to(h.dtype) / 0.7
        self.masks.append(mask)
        return h * mask


def test_two_threads_training_with_dropout_get_exact_gradients():
    """Each thread trains its own model; the engine's lock keeps their random numbers apart."""
    errors: dict[int, object] = {}
    barrier = threading.Barrier(2)

    def train(k: int) -> None:
        try:
            torch.manual_seed(k)
            blocks = [revgrad.AdditiveCoupling(nn.Sequential(_linear(2, 16), _SpyDropout(), _linear(16, 2)),
                                               nn.Sequential(_linear(2, 16), _SpyDropout(), _linear(16, 2)))
                      for _ in range(4)]
            ref = copy.deepcopy(blocks)
            model = revgrad.reversible(blocks, check="correct" if k else "off")
            spies = [m for m in model.modules() if isinstance(m, _SpyDropout)]
            ref_spies = [m for m in nn.ModuleList(ref).modules() if isinstance(m, _SpyDropout)]
            data = torch.Generator().manual_seed(100 + k)  # the data comes from the thread's own generator
            barrier.wait()
            worst = 0.0
            for _ in range(10):
                for s in spies:
                    s.masks.clear()
                x = torch.randn(32, 4, generator=data, dtype=DT).requires_grad_()
                y = model(x)
                forward_masks = [s.masks[0] for s in spies]  # backward's replays append more
                scalar_loss(y).backward()
                for s, m in zip(ref_spies, forward_masks):
                    s.given = [m]
                xr = x.detach().requires_grad_()
                scalar_loss(plain_chain(ref, xr)).backward()
                worst = max(worst, float((x.grad - xr.grad).norm() / xr.grad.norm()))
            errors[k] = worst
        except Exception as error:  # reported by the main thread
            errors[k] = error

    threads = [threading.Thread(target=train, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert not isinstance(errors[k], Exception), f"thread {k}: {errors[k]!r}"
        assert errors[k] <= TOL[DT], f"thread {k}: input gradient off by {errors[k]:.3g}"


# -- in-place sub-networks -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["f", "g", "net"])
@pytest.mark.parametrize("batch", [1, 3])
def test_subnetwork_modifying_its_input_in_place_is_refused(where, batch):
    relu = nn.Sequential(nn.ReLU(inplace=True), _linear(2, 2))
    if where == "net":
        block = revgrad.AffineCoupling(nn.Sequential(nn.ReLU(inplace=True), _linear(2, 4)))
    else:
        block = revgrad.AdditiveCoupling(relu if where == "f" else _mlp(2), relu if where == "g" else _mlp(2))
    model = revgrad.reversible([revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), block])
    x = torch.randn(batch, 4, dtype=DT, requires_grad=True)
    with pytest.raises(revgrad.BlockError, match=rf"block 1 \(\w+Coupling\).*{where} modified its input in place"):
        model(x)


class _InPlaceBlock(nn.Module):
    def forward(self, x):
        return x.mul_(2.0)

    def inverse(self, y):
        return y / 2.0


def test_block_modifying_its_input_in_place_is_refused():
    model = revgrad.reversible([revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), _InPlaceBlock()])
    with pytest.raises(revgrad.BlockError, match=r"block 1 \(_InPlaceBlock\) modified its input in place"):
        model(torch.randn(3, 4, dtype=DT, requires_grad=True))


# -- empty batches, torch.func, options -------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
def test_empty_batch(check):
    model = _bn_chain(check).eval()
    plain = copy.deepcopy(list(model))
    x = torch.randn(0, 4, dtype=DT)
    got, ref = _run(model, x), _run(plain, x)
    assert got[0].shape == (0, 4) and got[1].shape == (0, 4)
    for g, g0 in zip(got[2], ref[2]):
        assert (g is None) == (g0 is None) and (g is None or torch.equal(g, g0))


def test_torch_func_transforms_equal_plain_autograd():
    func = torch.func
    torch.manual_seed(0)
    blocks = [revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), revgrad.AffineCoupling(_linear(2, 4))]
    model, plain = revgrad.reversible(copy.deepcopy(blocks)), copy.deepcopy(blocks)
    x = torch.randn(3, 4, dtype=DT)

    def loss(run):
        return lambda h: scalar_loss(run(h))

    with pytest.warns(RuntimeWarning, match="torch.func"):
        g = func.grad(loss(model))(x)
    assert_rel_close(g, func.grad(loss(lambda h: plain_chain(plain, h)))(x))
    params = dict(model.named_parameters())
    gp = func.grad(lambda p: scalar_loss(func.functional_call(model, p, (x,))))(params)
    gp0 = func.grad(lambda p: scalar_loss(func.functional_call(nn.Sequential(*plain), p, (x,))))(
        dict(nn.Sequential(*plain).named_parameters())
    )
    for name in params:
        assert_rel_close(gp[name], gp0[name], name=name)
    _, vjp = func.vjp(lambda h: model(h)[0], x)
    _, vjp0 = func.vjp(lambda h: plain_chain(plain, h)[0], x)
    assert_rel_close(vjp(torch.ones(3, 4, dtype=DT))[0], vjp0(torch.ones(3, 4, dtype=DT))[0])
    v = func.vmap(lambda h: model(h[None])[0].sum())(x)
    assert_rel_close(v, func.vmap(lambda h: plain_chain(plain, h[None])[0].sum())(x))


@pytest.mark.parametrize(
    "options",
    [{"tol": "1e-5"}, {"tol": True}, {"tol": -1.0}, {"tol": float("nan")},
     {"anchor_every": True}, {"anchor_every": 1.5}, {"anchor_every": 0}, {"graph_budget": True},
     {"graph_budget": 1.5}, {"release_after": True}, {"adaptive_budget": True}, {"check": "on"},
     {"warn": "yes"}, {"preserve_rng_state": 1}],
    ids=lambda o: f"{next(iter(o))}={next(iter(o.values()))!r}",
)
def test_bad_options_are_refused_before_anything_runs(options):
    blocks = [revgrad.AdditiveCoupling(_mlp(2), _mlp(2))]
    with pytest.raises((TypeError, ValueError), match=rf"^revgrad: {next(iter(options))}"):
        revgrad.reversible(blocks, **options)


# -- report honesty --------------------------------------------------------------------------------


def test_every_failed_check_is_accounted_for_in_the_report():
    from chains import exploding_chain

    # release_after < 20: adaptive anchors' rebuilds are measured every step (by default every 10th).
    model = revgrad.reversible(exploding_chain(12), check="correct", warn=False, release_after=9)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    seen_adaptive = False
    for _ in range(4):
        x = torch.randn(2, 4, 6, 6)
        scalar_loss(model(x)).backward()
        opt.step()
        opt.zero_grad()
        rep = model.last_report
        failed = {i for i, e in enumerate(rep.errors) if e > rep.tol}
        assert failed <= set(rep.corrected) | set(rep.from_adaptive), rep
        seen_adaptive |= bool(rep.from_adaptive)
    assert seen_adaptive, "the chain should fail checks where adaptive anchors supply the input"


# -- data-dependent initialisation (normflows' ActNorm) ---------------------------------------------


def test_normflows_actnorm_trains_as_plain_autograd():
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    blocks = [nf.flows.ActNorm((4,)), revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), nf.flows.ActNorm((4,)),
              nf.flows.AffineConstFlow((4,))]
    blocks = [b.to(DT) for b in blocks]
    plain = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, check="off")
    opt, opt0 = (torch.optim.Adam(_params(m), lr=1e-2) for m in (model, plain))
    for step in range(4):
        x = torch.randn(6, 4, dtype=DT) * 3 + 1
        _assert_same(_run(model, x), _run(_broadcasting(plain), x, params=_params(plain)))
        opt.step(), opt0.step()
        opt.zero_grad(), opt0.zero_grad()
        for p, p0 in zip(model.parameters(), nn.ModuleList(plain).parameters()):
            assert_rel_close(p, p0, name=f"parameter after step {step}")


# -- log-determinants of one number for the whole batch ---------------------------------------------


class _ScalarLogdet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.s = nn.Parameter(torch.linspace(-0.2, 0.3, 4, dtype=DT))

    def forward(self, x):
        ld = self.s.sum()
        ld = {"0-dim": ld, "[1]": ld.reshape(1), "number": 0.5}[self.kind]
        return x * self.s.exp(), ld

    def inverse(self, y):
        return y * (-self.s).exp()


@pytest.mark.parametrize("kind", ["0-dim", "[1]", "number"])
@pytest.mark.parametrize("check", ["off", "correct"])
def test_logdet_of_one_number_is_broadcast(kind, check):
    torch.manual_seed(0)
    blocks = [_ScalarLogdet(kind), revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), _ScalarLogdet(kind)]
    assert all(revgrad.is_block(b) for b in blocks)
    plain = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, check=check)
    x = torch.randn(3, 4, dtype=DT)
    _, logdet = model(x.requires_grad_())
    assert logdet.shape == (3,)
    _assert_same(_run(model, x), _run(_broadcasting(plain), x, params=_params(plain)))


def test_freia_scalar_log_jacobian_is_broadcast():
    fm = pytest.importorskip("FrEIA.modules")
    torch.manual_seed(0)
    freia = fm.LearnedElementwiseScaling([(4,)]).to(DT)
    with torch.no_grad():
        freia.s.normal_()
    block = revgrad.FrEIABlock(freia)
    tail = revgrad.AdditiveCoupling(_mlp(2), _mlp(2))
    model = revgrad.reversible([block, tail])
    x = torch.randn(3, 4, dtype=DT)
    y, logdet = model(x)
    (y0,), jac = freia([x])
    assert_rel_close(y, tail(y0))
    assert logdet.shape == (3,) and torch.allclose(logdet, jac.reshape(()).expand(3))


# -- autograd inside a block's forward, names of wrapped modules ------------------------------------


def test_block_using_autograd_inside_its_forward():
    fm = pytest.importorskip("FrEIA.modules")
    torch.manual_seed(0)
    freia = fm.IResNetLayer([(4,)], hutchinson_samples=1, internal_size=8, n_internal_layers=1).to(DT)
    ref = copy.deepcopy(freia)
    tail = revgrad.AdditiveCoupling(_mlp(2), _mlp(2))
    plain = [revgrad.FrEIABlock(ref), copy.deepcopy(tail)]
    for check in CHECKS:
        model = revgrad.reversible([revgrad.FrEIABlock(freia), tail], check=check)
        x = torch.randn(3, 4, dtype=DT)
        _assert_same(_run(model, x, seed=5), _run(plain, x, seed=5))
        for p in _params(plain):
            p.grad = None
        for p in model.parameters():
            p.grad = None


def test_errors_name_the_wrapped_module():
    fm = pytest.importorskip("FrEIA.modules")
    torch.manual_seed(0)
    coupling = fm.GLOWCouplingBlock([(4,)], subnet_constructor=lambda i, o: nn.Linear(i, o, dtype=DT))
    block = revgrad.FrEIABlock(coupling)
    block.inverse = lambda y: revgrad.FrEIABlock.inverse(block, y) * 1.01  # a broken inverse
    model = revgrad.reversible([revgrad.AdditiveCoupling(_mlp(2), _mlp(2)), block,
                                revgrad.AdditiveCoupling(_mlp(2), _mlp(2))], check="detect")
    y, logdet = model(torch.randn(3, 4, dtype=DT, requires_grad=True))
    with pytest.raises(revgrad.ReconstructionError, match=r"block 1 \(FrEIABlock: GLOWCouplingBlock\)"):
        (y.sum() + logdet.sum()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = revgrad.stability_report(model, torch.randn(3, 4, dtype=DT))
    assert "FrEIABlock: GLOWCouplingBlock" in report.blocks[1].name
