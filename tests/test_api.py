"""The public API: ``revgrad.reversible`` conversions, option validation and protocol errors.

Conversions are compared with plain autograd on deep copies (``assert_rel_close``, TOL table). Every
error test also checks that nothing was lost: parameters, buffers and the global RNG state are those
the same failing call leaves under plain autograd (or, for errors raised before anything ran, those
from before the call).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import assert_rel_close, named_grads, plain_chain, scalar_loss
from test_properties import MODES, ChannelMLP, UserCoupling, assert_grads_match, assert_outputs_equal, make_chain, randn
from torch import nn

import revgrad

MODE_IDS = sorted(MODES)


def _assert_matches_plain(model: nn.Module, ref_blocks: list[nn.Module]) -> None:
    """One float64 step: output and every gradient equal plain autograd on ``ref_blocks``."""
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out, ref_out = model(x), plain_chain(ref_blocks, ref_x)
    assert_outputs_equal(out, ref_out)
    scalar_loss(out).backward()
    scalar_loss(ref_out).backward()
    assert_grads_match(named_grads(model, x), named_grads(nn.Sequential(*ref_blocks), ref_x))


def snapshot(model: nn.Module) -> dict:
    """Everything an error must not lose: parameter and buffer values (and objects), grads, RNG state."""
    return {
        "params": {n: (p, p.detach().clone(), p.grad) for n, p in model.named_parameters()},
        "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
        "rng": torch.get_rng_state(),
    }


def check_no_lost_state(before: dict, model: nn.Module, expected: dict | None = None) -> None:
    """``model`` and the RNG are as in ``before`` (``expected``: the state plain autograd left instead)."""
    expected = before if expected is None else expected
    params = dict(model.named_parameters())
    assert params.keys() == before["params"].keys()
    for name, (obj, value, grad) in before["params"].items():
        assert params[name] is obj, f"parameter {name} was replaced"
        assert_rel_close(params[name], value, tol=0.0, name=f"parameter {name}")
        assert params[name].grad is grad, f"parameter {name}: .grad changed by a failed call"
    buffers = dict(model.named_buffers())
    assert buffers.keys() == before["buffers"].keys()
    for name, (obj, _) in before["buffers"].items():
        assert buffers[name] is obj, f"buffer {name} was replaced (by a throwaway copy?)"
        want = expected["buffers"][name][1]
        assert torch.equal(buffers[name], want), f"buffer {name} = {buffers[name]} != {want}"
    assert torch.equal(torch.get_rng_state(), expected["rng"]), "the global RNG state differs"


# --------------------------------------------------------------------------------------------------
# Conversions


def blocks4(dtype=torch.float64) -> list[nn.Module]:
    return make_chain(["additive", "affine-sigmoid", "linear-logdet", "user-coupling"], 4, dtype, seed=0)


CONTAINERS = {
    "Sequential": lambda bs: nn.Sequential(*bs),
    "list": list,
    "tuple": tuple,
    "ModuleList": nn.ModuleList,
    "ReversibleSequential": lambda bs: revgrad.ReversibleSequential(*bs, check="off"),
}


# Modules are converted in place; what cannot run a chain itself (lists, ModuleList) gets a new one.
IN_PLACE = {"Sequential", "ReversibleSequential"}


@pytest.mark.parametrize("container", list(CONTAINERS), ids=list(CONTAINERS))
def test_container_of_blocks_becomes_reversible_sequential(container):
    blocks = blocks4()
    ref_blocks = copy.deepcopy(blocks)
    source = CONTAINERS[container](blocks)
    reference = nn.Sequential(*blocks)  # what state_dict keys and parameter order must be
    model = revgrad.reversible(source, check="detect")

    assert type(model) is revgrad.ReversibleSequential
    if container in IN_PLACE:
        assert model is source, "a module must be converted in place and returned"
    else:
        assert model is not source
        assert type(source) is type(CONTAINERS[container]([])), "a list must be left as it was"
    assert model.config.check == "detect"
    assert all(a is b for a, b in zip(model, blocks, strict=True)), "blocks must be shared, not copied"
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(a is b for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    assert list(model.state_dict()) == list(reference.state_dict())
    if isinstance(source, nn.Module):
        assert list(model.state_dict()) == list(source.state_dict())

    _assert_matches_plain(model, ref_blocks)


def test_single_block_becomes_one_block_chain():
    block = blocks4()[0]
    model = revgrad.reversible(block)
    assert type(model) is revgrad.ReversibleSequential and len(model) == 1 and model[0] is block


@pytest.mark.parametrize("container", ["list", "ModuleList", "tuple"], ids=["list", "ModuleList", "tuple"])
def test_list_with_non_block_names_item_and_class(container):
    items = [*blocks4()[:2], nn.Linear(4, 4), blocks4()[3]]
    source = CONTAINERS[container](items)
    before = snapshot(nn.ModuleList(items))
    with pytest.raises(TypeError, match=r"item 2 \(Linear\)"):
        revgrad.reversible(source)
    check_no_lost_state(before, nn.ModuleList(items))


class Downsample(nn.Module):
    """Not invertible: halves the spatial size and doubles the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.avg_pool2d(x, 2)
        return torch.cat([h, -h], dim=1)


class TinyRevNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(  # blocks without logdet, so that the plain model runs as it is
            *make_chain(["additive", "linear"], 4, torch.float32, seed=1),
            Downsample(),
            *make_chain(["additive", "user-coupling", "elementwise"], 8, torch.float32, seed=2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _compare_model(model, ref, x0) -> None:
    x, ref_x = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out, ref_out = model(x), ref(ref_x)
    assert_outputs_equal(out, ref_out)
    scalar_loss(out).backward()
    scalar_loss(ref_out).backward()
    assert_grads_match(named_grads(model, x), named_grads(ref, ref_x))


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_model_with_stages_converted_in_place(mode):
    torch.manual_seed(0)
    model = TinyRevNet()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    out = revgrad.reversible(model, **MODES[mode], anchor_every=2)
    assert out is model
    assert type(model.body) is revgrad.ReversibleSequential and model.body.config.check == MODES[mode]["check"]
    assert type(model.head) is nn.Sequential, "a Sequential without blocks must stay plain"
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    _compare_model(model, ref, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)))


def _nested_stages():
    """Stages (Sequentials of blocks only) inside a Sequential, split by a plain layer.

    Blocks before a plain layer return no logdet: a plain layer cannot take a ``(y, logdet)`` pair,
    in the plain model or in the converted one.
    """
    return nn.Sequential(
        nn.Sequential(*make_chain(["additive", "elementwise"], 4, torch.float32, seed=3)),
        nn.Linear(4, 4),
        nn.Sequential(nn.Sequential(*make_chain(["user-coupling", "linear"], 4, torch.float32, seed=4))),
    )


def _nested_mixed():
    """An inner Sequential holding blocks and a plain layer, inside an outer Sequential."""
    return nn.Sequential(
        nn.Sequential(
            *make_chain(["additive", "linear"], 4, torch.float32, seed=5),
            nn.Linear(4, 4),
            *make_chain(["additive"], 4, torch.float32, seed=6),
        ),
        nn.Tanh(),
        nn.Linear(4, 2),
    )


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = nn.ModuleDict({"net": nn.Sequential(nn.Identity(), inner)})

    def forward(self, x):
        return self.inner["net"](x)


NESTED = {
    "stages-in-sequential": _nested_stages,
    "mixed-inner-sequential": _nested_mixed,
    "deep-in-module": lambda: _Wrapper(nn.Sequential(nn.Sequential(_nested_stages()))),
}


def _forward_plain(model):
    """Reference forward for nested containers whose children may return (y, logdet) pairs."""

    def run(x):
        out = x
        logdet = None
        for m in _leaves(model):
            if revgrad.is_block(m):
                res = m(out)
                out, ld = res if isinstance(res, tuple) else (res, None)
                if ld is not None:
                    logdet = ld if logdet is None else logdet + ld
            else:
                out = m(out)
        return out if logdet is None else (out, logdet)

    return run


def _leaves(module):
    """Blocks and plain layers of nested Sequentials, in execution order."""
    if revgrad.is_block(module) or not isinstance(module, (nn.Sequential, nn.ModuleDict, _Wrapper)):
        return [module]
    children = module.values() if isinstance(module, nn.ModuleDict) else module.children()
    return [leaf for child in children for leaf in _leaves(child)]


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("structure", list(NESTED), ids=list(NESTED))
def test_nested_sequentials_converted(mode, structure):
    torch.manual_seed(0)
    model = NESTED[structure]()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    out = revgrad.reversible(model, **MODES[mode])
    assert out is model
    assert [n for n, _ in model.named_parameters()] == names
    assert any(type(m) is revgrad.ReversibleSequential for m in model.modules())
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    x, ref_x = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    got, want = model(x), _forward_plain(ref)(ref_x)
    assert_outputs_equal(got, want)
    scalar_loss(got).backward()
    scalar_loss(want).backward()
    assert_grads_match(named_grads(model, x), named_grads(ref, ref_x))


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        return self.seq(x)


NO_BLOCK = {
    "Linear": lambda: nn.Linear(4, 4),
    "Sequential": lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
    "empty-Sequential": nn.Sequential,
    "model": NoBlocks,
    "empty-list": list,
    "empty-ModuleList": nn.ModuleList,
}


@pytest.mark.parametrize("what", list(NO_BLOCK), ids=list(NO_BLOCK))
def test_no_block_anywhere_raises_type_error_mentioning_inverse(what):
    module = NO_BLOCK[what]()
    probe = module if isinstance(module, nn.Module) else nn.ModuleList(module)
    before = snapshot(probe)
    types = [type(m) for m in probe.modules()]
    with pytest.raises(TypeError, match="inverse"):
        revgrad.reversible(module)
    assert [type(m) for m in probe.modules()] == types
    check_no_lost_state(before, probe)


def test_non_module_raises_type_error():
    with pytest.raises(TypeError, match="int"):
        revgrad.reversible(42)


# --------------------------------------------------------------------------------------------------
# Option validation

BAD_OPTIONS = {
    "check=bogus": dict(check="bogus"),
    "check=None": dict(check=None),
    "tol=0": dict(tol=0.0),
    "tol=-1e-5": dict(tol=-1e-5),
    "tol=nan": dict(tol=math.nan),
    "anchor_every=0": dict(anchor_every=0),
    "anchor_every=-3": dict(anchor_every=-3),
    "anchor_every=1.5": dict(anchor_every=1.5),
    "release_after=0": dict(release_after=0),
}


@pytest.mark.parametrize("options", list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
@pytest.mark.parametrize("entry", ["reversible(list)", "ReversibleSequential", "reversible(model)"],
                         ids=["reversible-list", "ReversibleSequential", "reversible-in-place"])
def test_invalid_options_raise_value_error_and_touch_nothing(entry, options):
    torch.manual_seed(0)
    model = TinyRevNet()
    before = snapshot(model)
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="revgrad"):
        if entry == "reversible(list)":
            revgrad.reversible([m for m in model.body if revgrad.is_block(m)], **options)
        elif entry == "ReversibleSequential":
            revgrad.ReversibleSequential(*model.body, **options)
        else:
            revgrad.reversible(model, **options)
    assert {n: type(m) for n, m in model.named_modules()} == types, "a failed conversion changed the model"
    check_no_lost_state(before, model)
    model(randn(1, 3, 4, 4))  # still usable


@pytest.mark.parametrize("options", list(BAD_OPTIONS.values())[:-1], ids=list(BAD_OPTIONS)[:-1])
def test_engine_config_validates(options):
    with pytest.raises(ValueError, match="revgrad"):
        revgrad.EngineConfig(**options)


def test_configure_with_invalid_options_keeps_previous_configuration():
    model = revgrad.ReversibleSequential(*blocks4(), check="detect", anchor_every=2)
    with pytest.raises(ValueError):
        model.configure(check="correct", release_after=0)
    assert model.config.check == "detect" and model.config.anchor_every == 2


# --------------------------------------------------------------------------------------------------
# Bad inputs and protocol errors


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=["int64", "int32", "bool"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_non_floating_input_raises_type_error(dtype, grad):
    model = revgrad.reversible(blocks4())
    before = snapshot(model)
    x = torch.ones(2, 4, dtype=dtype)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        model(x)
    check_no_lost_state(before, model)


def test_zero_dim_input_raises():
    model = revgrad.reversible(blocks4())
    with pytest.raises(ValueError, match="batch"):
        model(torch.tensor(1.0, dtype=torch.float64))


class BadInverse(nn.Module):
    """Invertible forward, but ``inverse`` drops a channel."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale

    def inverse(self, y):
        return y[:, :-1] / self.scale


def _noisy_bn_block() -> nn.Module:
    """A block above the bad one whose backward replays dropout and shields BatchNorm statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = nn.Sequential(nn.Linear(2, 4, bias=False), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 2))
    return UserCoupling(4, net).double()


LAYOUTS = {
    # children, child index of BadInverse; anchor_every=2 keeps it off the anchors (run index 1 or 3)
    "blocks-only": lambda: ([*blocks4()[:1], BadInverse(), *blocks4()[1:2], _noisy_bn_block()], 1),
    "after-plain-layer": lambda: (
        [nn.Linear(4, 4).double(), *blocks4()[:1], BadInverse(), _noisy_bn_block()], 2
    ),
}


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_inverse_of_wrong_shape_raises_block_error_naming_block(mode, layout):
    children, index = LAYOUTS[layout]()
    model = revgrad.ReversibleSequential(*children, **MODES[mode], anchor_every=2)
    x = randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss = scalar_loss(model(x))
    after_forward = snapshot(model)
    with pytest.raises(revgrad.BlockError, match=rf"block {index} \(BadInverse\)"):
        loss.backward()
    check_no_lost_state(after_forward, model)
    assert x.grad is None


BAD_SUBNET = {
    "additive-f": lambda: revgrad.AdditiveCoupling(ChannelMLP(2, 3), ChannelMLP(2, 2)),
    "additive-g": lambda: revgrad.AdditiveCoupling(ChannelMLP(2, 2), ChannelMLP(2, 1)),
    "affine-net": lambda: revgrad.AffineCoupling(ChannelMLP(2, 2)),
}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("which", list(BAD_SUBNET), ids=list(BAD_SUBNET))
def test_coupling_subnetwork_of_wrong_shape_raises_naming_coupling(which, grad):
    coupling_name, sub = which.split("-")
    children = [_noisy_bn_block(), BAD_SUBNET[which]().double()]
    ref_children = copy.deepcopy(children)
    model = revgrad.reversible(children)
    x = randn(5, 4, dtype=torch.float64, requires_grad=True)
    expected = f"{'AdditiveCoupling' if coupling_name == 'additive' else 'AffineCoupling'}.{sub}"

    torch.manual_seed(1)
    ref = nn.Sequential(*ref_children)
    with torch.set_grad_enabled(grad), pytest.raises(revgrad.BlockError):
        plain_chain(ref_children, x)
    plain_state = snapshot(ref)

    torch.manual_seed(1)
    before = snapshot(model)
    with torch.set_grad_enabled(grad), pytest.raises(revgrad.BlockError, match=expected):
        model(x)
    check_no_lost_state(before, model, expected=plain_state)


class WrongLogdet(nn.Module):
    """Forward/inverse only; returns a logdet of a configurable wrong shape."""

    def __init__(self, shape_of) -> None:
        super().__init__()
        self.shape_of = shape_of
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale.exp(), self.scale.expand(self.shape_of(x))

    def inverse(self, y):
        return y * (-self.scale).exp()


class FusedElementwise(nn.Module):
    """A user block implementing the fused protocol (deterministic: it never calls ``tape.mark``)."""

    def __init__(self, channels: int, logdet_shape=None) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(0.2 * torch.arange(1.0, channels + 1, dtype=torch.float64))
        self.logdet_shape = logdet_shape

    def forward(self, x):
        return self.forward_recording(x, None)

    def forward_recording(self, x, tape):
        y = x * self.log_scale.exp()
        shape = (x.shape[0],) if self.logdet_shape is None else self.logdet_shape(x)
        return y, self.log_scale.sum().expand(shape)

    def inverse(self, y):
        return y * (-self.log_scale).exp()

    def inverse_for_backward(self, y, tape, params):
        x = self.inverse(y.detach())
        with torch.enable_grad():
            x_ = x.detach().requires_grad_()
            y_, ld_ = self.forward_recording(x_, tape)

        def vjp(grad_y, grad_logdet):
            outs, grads = [y_], [grad_y]
            if grad_logdet is not None:
                outs.append(ld_)
                grads.append(grad_logdet)
            gx, *gp = torch.autograd.grad(outs, [x_, *params], grads, allow_unused=True)
            return gx, tuple(gp)

        return x, vjp


WRONG_LOGDET = {
    "shape-B-1": lambda: WrongLogdet(lambda x: (x.shape[0], 1)),
    "shape-B-plus-1": lambda: WrongLogdet(lambda x: (x.shape[0] + 1,)),
    "fused-shape-B-1": lambda: FusedElementwise(4, lambda x: (x.shape[0], 1)),
}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("which", list(WRONG_LOGDET), ids=list(WRONG_LOGDET))
def test_logdet_of_wrong_shape_raises_block_error(which, grad):
    block = WRONG_LOGDET[which]()
    model = revgrad.reversible([*blocks4()[:2], block])
    x = randn(3, 4, dtype=torch.float64, requires_grad=True)
    before = snapshot(model)
    pattern = rf"block 2 \({type(block).__name__}\).*logdet"
    with torch.set_grad_enabled(grad), pytest.raises(revgrad.BlockError, match=pattern):
        model(x)
    check_no_lost_state(before, model)


@pytest.mark.parametrize("mode", MODE_IDS, ids=MODE_IDS)
def test_user_fused_block_that_never_marks_the_tape(mode):
    """The fused protocol asks for ``tape.mark()`` before random parts; a deterministic block has none."""
    blocks = [FusedElementwise(4), *blocks4()[:2], FusedElementwise(4)]
    assert isinstance(blocks[0], revgrad.FusedBlock)
    ref_blocks = copy.deepcopy(blocks)
    model = revgrad.reversible(blocks, **MODES[mode], anchor_every=2)
    _assert_matches_plain(model, ref_blocks)


def test_parameter_replaced_between_forward_and_backward_stays_replaced():
    """Backward recomputes with forward's parameters (as plain autograd's saved graph would) and
    leaves the module holding the parameter the user put there after forward."""
    torch.manual_seed(0)
    blocks = [revgrad.AdditiveCoupling(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(3)]
    ref = copy.deepcopy(nn.Sequential(*blocks))
    model = revgrad.reversible(nn.Sequential(*blocks))
    x = torch.randn(5, 4, dtype=torch.float32)
    old = model[1].f.weight
    out = model(x)
    new = nn.Parameter(torch.zeros_like(old))
    model[1].f.weight = new
    out.square().sum().backward()
    ref(x).square().sum().backward()
    assert model[1].f.weight is new and new.grad is None
    torch.testing.assert_close(old.grad, ref[1].f.weight.grad)
    torch.testing.assert_close(model[0].g.weight.grad, ref[0].g.weight.grad)
