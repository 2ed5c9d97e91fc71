"""Training semantics: what a training step through revgrad must leave behind, exactly as plain autograd.

Every test runs the same blocks twice, through ``revgrad.reversible`` and (on deep copies) through plain
autograd, and compares with ``assert_rel_close`` (TOL table in ``tests/reference.py``): RNG replay and
the caller's RNG state, BatchNorm statistics, autocast, retain_graph / create_graph, in-place
modification, no-grad modes, hooks, ``torch.autograd.grad``, the chain's inverse, and logdets.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from reference import TOL, assert_rel_close, named_grads, plain_chain, rel_error, scalar_loss
from test_properties import (
    MODES,
    UserCoupling,
    assert_grads_match,
    assert_outputs_equal,
    make_chain,
    randn,
)
from torch import nn

import revgrad
import revgrad.engine.backprop

MODE_IDS = sorted(MODES)


def dropout_chain(dtype=torch.float32, p: float = 0.3) -> list[nn.Module]:
    """Fused couplings with dropout in every sub-network, an unfused one, and a deterministic block."""
    return make_chain(
        ["additive", "affine-sigmoid", "user-coupling", "linear", "additive", "affine-exp", "user-coupling"],
        4, dtype, seed=11, dropout=p,
    )


# --------------------------------------------------------------------------------------------------
# RNG


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("dropout", [0.3, 0.0], ids=["dropout", "deterministic"])
def test_rng_replayed_and_caller_rng_state_preserved(mode, dropout):
    """Dropout masks are replayed in backward; the caller's RNG ends as plain autograd leaves it.

    The caller draws from the global generator between forward and backward: backward must replay the
    forward's masks regardless, and must neither reseed nor advance the caller's generator.
    """
    blocks = dropout_chain(p=dropout)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode], anchor_every=3)
    ref = nn.Sequential(*ref_blocks)
    x0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def step(run):
        torch.manual_seed(1234)
        x = x0.clone().requires_grad_()
        out = run(x)
        between = torch.rand(3)  # the caller uses the RNG between forward and backward
        scalar_loss(out).backward()
        return out, x, between, torch.get_rng_state(), torch.initial_seed(), torch.rand(2)

    out, x, between, state, seed, after = step(model)
    ref_out, ref_x, ref_between, ref_state, ref_seed, ref_after = step(lambda h: plain_chain(ref_blocks, h))

    assert_outputs_equal(out, ref_out)
    assert torch.equal(between, ref_between)
    assert torch.equal(state, ref_state), "global RNG state after the step differs from plain autograd's"
    assert seed == ref_seed
    assert torch.equal(after, ref_after)
    assert_grads_match(named_grads(model, x), named_grads(ref, ref_x))


# --------------------------------------------------------------------------------------------------
# Buffers


def bn_net(cin: int, cout: int, momentum) -> nn.Module:
    # no bias before the BatchNorm: its gradient is zero in exact arithmetic (rounding noise only)
    return nn.Sequential(
        nn.Linear(cin, 6, bias=False), nn.BatchNorm1d(6, momentum=momentum), nn.Tanh(), nn.Linear(6, cout)
    )


def bn_chain(momentum) -> list[nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        blocks = [
            revgrad.AdditiveCoupling(bn_net(2, 2, momentum), bn_net(2, 2, momentum)),
            revgrad.AffineCoupling(bn_net(2, 4, momentum), scale="bounded"),
            UserCoupling(4, bn_net(2, 2, momentum)),
            revgrad.AdditiveCoupling(bn_net(2, 2, momentum), bn_net(2, 2, momentum)),
        ]
    return [b.double() for b in blocks]


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_batchnorm_running_stats_match_plain_training(mode, momentum):
    """Several SGD steps in train mode: running stats, num_batches_tracked and parameters as plain."""
    blocks = bn_chain(momentum)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode], anchor_every=2)
    ref = nn.Sequential(*ref_blocks)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        for run, o in ((model, opt), (lambda h: plain_chain(ref_blocks, h), ref_opt)):
            o.zero_grad()
            scalar_loss(run(x)).backward()
            o.step()
        for (name, buf), (ref_name, ref_buf) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
            assert name == ref_name
            if buf.dtype == torch.long:
                assert torch.equal(buf, ref_buf), f"step {step}: {name} = {buf} != {ref_buf}"
            else:  # the first step's statistics are computed from identical tensors: bitwise equal
                assert_rel_close(buf, ref_buf, tol=0.0 if step == 0 else None, name=f"step {step}: {name}")
        for (name, p), (_, ref_p) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            assert_rel_close(p, ref_p, name=f"step {step}: {name}")


class RunningCenter(nn.Module):
    """Centres by a running mean it reads, then updates (in training): the output depends on the buffer."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(cin))
        self.lin = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x - self.mean)
        if self.training:
            with torch.no_grad():
                self.mean.lerp_(x.mean(0), 0.5)
        return y


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_block_reading_a_buffer_it_updates_sees_forward_value_in_backward(mode):
    """Backward must evaluate blocks with the buffers forward saw, not the values forward wrote.

    (``replay.py``: every re-evaluation "must see what the forward pass saw: ... the same buffers".)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        blocks = [revgrad.AdditiveCoupling(RunningCenter(2, 2), RunningCenter(2, 2)) for _ in range(3)]
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    ref = nn.Sequential(*ref_blocks)
    x0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)) + 3.0
    x, ref_x = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out = model(x)
    ref_out = plain_chain(ref_blocks, ref_x)
    assert_outputs_equal(out, ref_out)
    scalar_loss(out).backward()
    scalar_loss(ref_out).backward()
    for (name, buf), (_, ref_buf) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert_rel_close(buf, ref_buf, tol=0.0, name=name)
    assert_grads_match(named_grads(model, x), named_grads(ref, ref_x))


# --------------------------------------------------------------------------------------------------
# Autocast


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_cpu_bf16_autocast_matches_plain_autocast(mode):
    """CPU bf16 autocast: forward bitwise as plain autocast, gradients within TOL[bfloat16] = 3e-2.

    Tolerance: the sub-networks compute in bf16 (eps 7.8e-3). Backward evaluates them at rebuilt
    inputs, which differ from the forward's by fp32 rounding (or, for an inverse that does not run in
    bf16, such as ``InvertibleLinear``'s solve, by bf16 rounding of the forward); one flipped bf16
    rounding moves an element by an ulp, so gradients agree with plain autocast to a few bf16 ulps
    accumulated over the chain, not to fp32 precision. That is the bf16 entry of the TOL table
    (measured: at most ~7e-3 with check="off"/"detect", 0 with "correct" here). Plain fp32 gradients
    without autocast are ~1e-3..1e-2 from plain autocast, so the test also checks that, summed over
    all gradients, revgrad is at least twice closer to plain autocast than fp32 is (backward really
    replays autocast).
    """
    kinds = ["additive", "affine-sigmoid", "affine-bounded", "user-coupling", "linear-logdet", "additive"]
    blocks = make_chain(kinds, 6, torch.float32, seed=21)
    fp32_blocks = copy.deepcopy(blocks)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode], anchor_every=2)
    ref = nn.Sequential(*ref_blocks)
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))

    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    scalar_loss(out).backward()  # backward outside autocast, as recommended

    ref_x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out = plain_chain(ref_blocks, ref_x)
    scalar_loss(ref_out).backward()

    fp32_x = x0.clone().requires_grad_()
    scalar_loss(plain_chain(fp32_blocks, fp32_x)).backward()

    assert out[0].dtype == ref_out[0].dtype and out[1].dtype == ref_out[1].dtype
    assert_outputs_equal(out, ref_out)
    grads, ref_grads = named_grads(model, x), named_grads(ref, ref_x)
    fp32_grads = named_grads(nn.Sequential(*fp32_blocks), fp32_x)
    rev_total = fp32_total = 0.0
    for name, ref_g in ref_grads.items():
        assert_rel_close(grads[name], ref_g, tol=TOL[torch.bfloat16], name=name)
        rev_total += rel_error(grads[name], ref_g)
        fp32_total += rel_error(fp32_grads[name], ref_g)
    assert rev_total < 0.5 * fp32_total, (
        f"revgrad is not closer to plain autocast ({rev_total:.3g}) than fp32 is ({fp32_total:.3g}): "
        "is autocast replayed in backward?"
    )


# --------------------------------------------------------------------------------------------------
# retain_graph / create_graph / in-place


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_backward_twice_with_retain_graph(mode):
    """Two backward passes over one graph (dropout and BatchNorm inside) give the same gradients."""
    blocks = dropout_chain() + [b.float() for b in bn_chain(0.1)]
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch.manual_seed(0)
    loss = scalar_loss(model(x))
    loss.backward(retain_graph=True)
    first = {k: v.clone() for k, v in named_grads(model, x).items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    x.grad = None
    loss.backward()
    second = named_grads(model, x)
    for name, g in first.items():
        assert_rel_close(second[name], g, tol=0.0, name=name)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), f"{name} changed in the second backward"

    ref_x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    scalar_loss(plain_chain(ref_blocks, ref_x)).backward()
    assert_grads_match(first, named_grads(nn.Sequential(*ref_blocks), ref_x))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("how", ["backward", "autograd.grad"], ids=["backward", "autograd-grad"])
def test_create_graph_raises_clear_error(how):
    model = revgrad.reversible(make_chain(["additive", "affine-exp"], 4, torch.float32, seed=0))
    x = randn(2, 4, requires_grad=True)
    loss = scalar_loss(model(x))
    with pytest.raises(RuntimeError, match="create_graph"):
        if how == "backward":
            loss.backward(create_graph=True)
        else:
            torch.autograd.grad(loss, [x, *model.parameters()], create_graph=True)


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("kinds", [["additive", "linear"], ["affine-sigmoid", "elementwise"]], ids=["y", "y-logdet"])
def test_output_modified_in_place_raises(mode, kinds):
    """Backward rebuilds from the output: modifying it in place must raise, not give a wrong gradient."""
    model = revgrad.reversible(make_chain(kinds, 4, torch.float32, seed=0), **MODES[mode])
    x = randn(3, 4, requires_grad=True)
    out = model(x)
    y = out[0] if isinstance(out, tuple) else out
    loss = scalar_loss(out)
    with torch.no_grad():
        y.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


# --------------------------------------------------------------------------------------------------
# No-grad modes: plain execution


@contextlib.contextmanager
def eval_no_grad(model):
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


CONTEXTS = {
    "no_grad": lambda model: torch.no_grad(),
    "inference_mode": lambda model: torch.inference_mode(),
    "eval+no_grad": eval_no_grad,
}


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("context", list(CONTEXTS), ids=list(CONTEXTS))
def test_no_grad_modes_run_blocks_plainly(monkeypatch, mode, context):
    calls = {"apply": 0, "fingerprint": 0}
    apply, fingerprint = revgrad.engine.backprop._RevBackprop.apply, revgrad.engine.backprop.fingerprint

    def counting_apply(*args):
        calls["apply"] += 1
        return apply(*args)

    def counting_fingerprint(*args, **kwargs):
        calls["fingerprint"] += 1
        return fingerprint(*args, **kwargs)

    monkeypatch.setattr(revgrad.engine.backprop._RevBackprop, "apply", counting_apply)
    monkeypatch.setattr(revgrad.engine.backprop, "fingerprint", counting_fingerprint)

    blocks = make_chain(["additive", "affine-sigmoid", "linear-logdet", "user-coupling"], 4, torch.float32, seed=0)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    x = randn(3, 4, requires_grad=True)
    with CONTEXTS[context](model):
        out = model(x)
        ref_out = plain_chain(ref_blocks, x)
    assert calls == {"apply": 0, "fingerprint": 0}
    assert not out[0].requires_grad and not out[1].requires_grad
    assert_outputs_equal(out, ref_out)

    scalar_loss(model(x)).backward()  # control: with grad the engine runs
    assert calls["apply"] == 1
    assert (calls["fingerprint"] > 0) == (mode != "off")


# --------------------------------------------------------------------------------------------------
# Gradients to parameters only; autograd.grad; hooks


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_parameters_get_gradients_when_input_does_not_require_grad(mode):
    blocks = make_chain(["affine-bounded", "additive", "linear-logdet", "user-coupling"], 5, torch.float64, seed=4)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    x = randn(3, 5, dtype=torch.float64)
    scalar_loss(model(x)).backward()
    scalar_loss(plain_chain(ref_blocks, x)).backward()
    assert x.grad is None
    assert_grads_match(named_grads(model), named_grads(nn.Sequential(*ref_blocks)))


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("wrt", ["params", "input+params", "input"], ids=["params", "input+params", "input"])
def test_autograd_grad_matches_plain(mode, wrt):
    blocks = make_chain(["additive", "affine-exp", "elementwise-logdet", "user-coupling"], 4, torch.float64, seed=8)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    ref = nn.Sequential(*ref_blocks)
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)

    def inputs(m):
        return {"params": [], "input+params": [x], "input": [x]}[wrt] + ([] if wrt == "input" else list(m.parameters()))

    got = torch.autograd.grad(scalar_loss(model(x)), inputs(model))
    want = torch.autograd.grad(scalar_loss(plain_chain(ref_blocks, x)), inputs(ref))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_rel_close(g, w, name=f"grad {i}")
    assert all(p.grad is None for p in model.parameters()), "autograd.grad must not accumulate into .grad"


def _hooked(model, hook_log: dict):
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: hook_log.setdefault(("tensor", name), []).append(g.clone()))
        p.register_post_accumulate_grad_hook(lambda p, name=name: hook_log.setdefault(("post", name), []).append(1))


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_parameter_hooks_fire_once_with_plain_gradients(mode):
    blocks = make_chain(["additive", "affine-sigmoid", "linear", "user-coupling"], 4, torch.float64, seed=9)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    ref = nn.Sequential(*ref_blocks)
    log, ref_log = {}, {}
    _hooked(model, log)
    _hooked(ref, ref_log)
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)
    scalar_loss(model(x)).backward()
    scalar_loss(plain_chain(ref_blocks, x)).backward()
    assert log.keys() == ref_log.keys()
    for key, ref_calls in ref_log.items():
        assert len(log[key]) == len(ref_calls) == 1, f"{key}: fired {len(log[key])} times"
        if key[0] == "tensor":
            assert_rel_close(log[key][0], ref_calls[0], name=str(key))


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("kind", ["additive", "affine-exp", "user-coupling", "linear"],
                         ids=["additive", "affine-exp", "user-coupling", "linear"])
def test_gradient_rescaling_parameter_hook_applied_once(mode, kind):
    """``p.register_hook(lambda g: g * 0.5)`` (clipping, scaling) must change the gradient once, as plain."""
    blocks = make_chain([kind, kind], 4, torch.float64, seed=15)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    ref = nn.Sequential(*ref_blocks)
    for p in [*model.parameters(), *ref.parameters()]:
        p.register_hook(lambda g: g * 0.5)
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    scalar_loss(model(x)).backward()
    scalar_loss(plain_chain(ref_blocks, ref_x)).backward()
    assert_grads_match(named_grads(model, x), named_grads(ref, ref_x))


def _module_hook_log(modules, log):
    for name, m in modules:
        m.register_full_backward_hook(
            lambda mod, gin, gout, name=name: log.setdefault(name, []).append(gout[0].detach().clone())
        )


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_module_backward_hooks_on_parameter_modules_fire(mode):
    """Full backward hooks on the Linear layers inside the blocks fire once, with plain grad_output."""
    blocks = make_chain(["additive", "affine-bounded", "user-coupling"], 4, torch.float64, seed=10)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode])
    ref = nn.Sequential(*ref_blocks)
    log, ref_log = {}, {}
    _module_hook_log([(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)], log)
    _module_hook_log([(n, m) for n, m in ref.named_modules() if isinstance(m, nn.Linear)], ref_log)
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)
    scalar_loss(model(x)).backward()
    scalar_loss(plain_chain(ref_blocks, x)).backward()
    assert set(log) == set(ref_log)
    for name, ref_calls in ref_log.items():
        assert len(log[name]) == len(ref_calls) == 1, f"{name}: fired {len(log[name])} times"
        assert_rel_close(log[name][0], ref_calls[0], name=name)


BLOCK_HOOK_KINDS = ["additive", "affine-sigmoid", "user-coupling", "linear"]


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("kind", BLOCK_HOOK_KINDS, ids=BLOCK_HOOK_KINDS)
def test_module_backward_hooks_on_blocks_fire(mode, kind):
    """A full backward hook on each block fires once per backward, with plain autograd's grad_output."""
    blocks = make_chain([kind] * 4, 4, torch.float64, seed=12)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode], anchor_every=2)
    log, ref_log = {}, {}
    _module_hook_log(list(model.named_children()), log)
    _module_hook_log(list(nn.Sequential(*ref_blocks).named_children()), ref_log)
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)
    scalar_loss(model(x)).backward()
    scalar_loss(plain_chain(ref_blocks, x)).backward()
    fired = {name: len(log.get(name, [])) for name in ref_log}
    assert fired == {name: 1 for name in ref_log}, f"backward hooks fired {fired}"
    for name, ref_calls in ref_log.items():
        assert_rel_close(log[name][0], ref_calls[0], name=name)


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("kind", BLOCK_HOOK_KINDS, ids=BLOCK_HOOK_KINDS)
def test_module_forward_hooks_on_blocks_fire_in_forward(mode, kind):
    """Forward hooks on each block fire during the forward pass (not only when backward recomputes)."""
    blocks = make_chain([kind] * 4, 4, torch.float64, seed=12)
    model = revgrad.reversible(blocks, **MODES[mode], anchor_every=2)
    seen = []
    for name, block in model.named_children():
        block.register_forward_hook(lambda mod, args, out, name=name: seen.append(name))
    model(randn(3, 4, dtype=torch.float64, requires_grad=True))
    assert seen == [name for name, _ in model.named_children()]


# --------------------------------------------------------------------------------------------------
# Inverse and logdet


INVERSE_KINDS = [
    "additive", "affine-sigmoid", "affine-exp", "affine-bounded", "linear-logdet", "elementwise", "user-coupling"
]


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_inverse_reconstructs_input_and_matches_plain_inverse_gradients(mode, dtype):
    blocks = make_chain(INVERSE_KINDS * 2, 5, dtype, seed=13)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode], anchor_every=3)
    ref = nn.Sequential(*ref_blocks)
    x = torch.randn(3, 5, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = plain_chain(ref_blocks, x)[0]

    y = y0.clone().requires_grad_()
    x_rec = model.inverse(y)
    assert_rel_close(x_rec, x, tol=100 * TOL[dtype], name="inverse(forward(x))")
    scalar_loss(x_rec).backward()

    ref_y = y0.clone().requires_grad_()
    h = ref_y
    for block in reversed(ref_blocks):
        h = block.inverse(h)
    assert_rel_close(x_rec, h, tol=0.0, name="x (revgrad inverse vs plain inverse)")
    scalar_loss(h).backward()
    assert_grads_match(named_grads(model, y), named_grads(ref, ref_y))


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("loss", ["y+logdet", "y-only", "logdet-only"], ids=["y+logdet", "y-only", "logdet-only"])
def test_mixed_logdet_chain_returns_sum_of_logdets(mode, loss):
    """Blocks with and without logdet (and a plain layer splitting two runs): (y, sum of logdets)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(14)
        children = [
            *make_chain(["additive", "affine-bounded", "linear", "elementwise-logdet"], 4, torch.float64, seed=1),
            nn.Linear(4, 4).double(),  # not a block: two runs of blocks, each with logdets
            *make_chain(["linear-logdet", "user-coupling", "affine-sigmoid", "additive"], 4, torch.float64, seed=2),
        ]
    ref_children = copy.deepcopy(children)
    model = revgrad.ReversibleSequential(*children, **MODES[mode])
    ref = nn.Sequential(*ref_children)
    losses = {
        "y+logdet": scalar_loss,
        "y-only": lambda out: scalar_loss(out[0]),
        "logdet-only": lambda out: (out[1] * torch.arange(1.0, 4.0, dtype=out[1].dtype)).sum(),
    }
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out = model(x)
    ref_out = plain_chain(ref_children, ref_x)
    assert isinstance(out, tuple) and len(out) == 2 and out[1].shape == (3,)
    # two runs of blocks: their logdets are added per run, then together (another summation order)
    assert_outputs_equal(out, ref_out, logdet_tol=TOL[torch.float64])
    losses[loss](out).backward()
    losses[loss](ref_out).backward()
    assert_grads_match(named_grads(model, x), named_grads(ref, ref_x))
