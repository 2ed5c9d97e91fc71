"""RevNet-38/110/164 (Gomez et al. 2017) and the Glow-style INN classifier."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from reference import assert_rel_close
from torch import nn

import revgrad
from revgrad.models import RevDownsample, RevNet, revnet38, revnet110, revnet164

# Gomez et al. 2017, Table 1 (CIFAR-10 parameter counts).
PAPER_PARAMS = {"revnet38": 0.46e6, "revnet110": 1.73e6, "revnet164": 1.75e6}
BUILDERS = {"revnet38": revnet38, "revnet110": revnet110, "revnet164": revnet164}
HAS_LAYERS = importlib.util.find_spec("revgrad.blocks.layers") is not None


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_revnet_forward_shape_and_param_count(name):
    torch.manual_seed(0)
    model = BUILDERS[name](num_classes=10)
    n = _count(model)
    rel = n / PAPER_PARAMS[name] - 1
    print(f"{name}: {n:,} parameters, paper {PAPER_PARAMS[name] / 1e6:.2f}M ({rel:+.1%})")
    assert abs(rel) <= 0.02, f"{name}: {n} parameters vs {PAPER_PARAMS[name]:.0f} in the paper"
    stages = [model.layer1, model.layer2, model.layer3]
    assert all(isinstance(s, revgrad.ReversibleSequential) for s in stages)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_revnet_structure():
    plain = revnet38(num_classes=7, memory_saving=False)
    assert isinstance(plain.fc, nn.Linear) and plain.fc.out_features == 7
    assert [len(s) for s in (plain.layer1, plain.layer2, plain.layer3)] == [3, 3, 3]
    assert not isinstance(plain.layer1[0], RevDownsample)  # 32 -> 32, stride 1: all reversible
    assert isinstance(plain.layer2[0], RevDownsample) and isinstance(plain.layer3[0], RevDownsample)
    assert all(isinstance(b, revgrad.AdditiveCoupling) for b in plain.layer2[1:])
    assert type(plain.layer1) is nn.Sequential
    deep = revnet164(memory_saving=False)
    assert isinstance(deep.layer1[0], RevDownsample)  # 32 -> 128 projection, stride 1
    assert [len(s) for s in (deep.layer1, deep.layer2, deep.layer3)] == [9, 9, 9]
    assert deep.fc.in_features == 512
    for name, builder in BUILDERS.items():  # depth = convolutions on the residual paths + fc
        assert _depth(builder(memory_saving=False)) == int(name[len("revnet"):]), name


def _depth(model: nn.Module) -> int:
    shortcuts = {id(m) for d in model.modules() if isinstance(d, RevDownsample) for m in d.modules()
                 if m is d.shortcut1 or m is d.shortcut2}
    convs = sum(isinstance(m, nn.Conv2d) and id(m) not in shortcuts for m in model.modules())
    return convs + 1


def test_state_dict_interchange():
    torch.manual_seed(1)
    plain = revnet38(memory_saving=False)
    saving = revnet38(memory_saving=True)
    assert list(plain.state_dict()) == list(saving.state_dict())
    saving.load_state_dict(plain.state_dict())
    plain2 = revnet110(memory_saving=False)
    plain2.load_state_dict(revnet110(memory_saving=True).state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.eval()
    saving.eval()
    with torch.no_grad():
        torch.testing.assert_close(saving(x), plain(x))


def test_revnet38_training_step_matches_plain():
    torch.manual_seed(2)
    plain = revnet38(memory_saving=False).double()
    saving = copy.deepcopy(plain)
    revgrad.reversible(saving, check="correct")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([3, 7])
    for model in (plain, saving):
        model.train()
        nn.functional.cross_entropy(model(x), target).backward()
    named = dict(saving.named_parameters())
    for name, p in plain.named_parameters():
        assert_rel_close(named[name].grad, p.grad, tol=1e-9, name=name)
    buffers = dict(saving.named_buffers())
    for name, b in plain.named_buffers():
        if b.is_floating_point():
            assert_rel_close(buffers[name], b, tol=1e-9, name=name)
        else:
            assert torch.equal(buffers[name], b), name
    assert saving.layer3.last_report is not None


def test_revnet38_training_step_fp32():
    torch.manual_seed(3)
    plain = revnet38(memory_saving=False)
    saving = revnet38(memory_saving=True)
    saving.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, saving):
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    named = dict(saving.named_parameters())
    for name, p in plain.named_parameters():
        assert_rel_close(named[name].grad, p.grad, tol=1e-4, name=name)
    buffers = dict(saving.named_buffers())
    for name, b in plain.named_buffers():
        assert_rel_close(buffers[name].double(), b.double(), tol=1e-4, name=name)


@pytest.mark.skipif(not HAS_LAYERS, reason="revgrad.blocks.layers (ActNorm, Shuffle, Squeeze, ...) is not there yet")
@pytest.mark.parametrize(
    "coupling, permutation", [("affine", "shuffle"), ("additive", "conv"), ("affine", "reverse")]
)
def test_glow_classifier_matches_plain(coupling, permutation):
    from revgrad.models import glow_classifier

    torch.manual_seed(4)
    plain = glow_classifier(
        in_channels=1, num_classes=10, levels=2, depth=2, hidden=8, coupling=coupling,
        permutation=permutation, memory_saving=False,
    ).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        plain(x)  # data-dependent initializations (ActNorm), if any, happen here, before the copy
    for p in plain.parameters():  # move off the identity start so every gradient is non-trivial
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    saving = copy.deepcopy(plain)
    revgrad.reversible(saving, check="correct")
    assert isinstance(saving.flow, revgrad.ReversibleSequential)
    assert list(plain.state_dict()) == list(saving.state_dict())
    outs = []
    for model in (plain, saving):
        xx = x.clone().requires_grad_()
        out = model(xx)
        loss = nn.functional.cross_entropy(out, torch.tensor([1, 2]))
        if model.last_logdet is not None:
            loss = loss - 1e-3 * model.last_logdet.sum()
        loss.backward()
        outs.append((out, xx.grad))
    assert outs[0][0].shape == (2, 10)
    assert saving.flow.last_report is not None
    assert_rel_close(outs[1][0], outs[0][0], tol=1e-10, name="logits")
    assert_rel_close(outs[1][1], outs[0][1], tol=1e-9, name="input grad")
    named = dict(saving.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is None:
            assert named[name].grad is None, name
        else:
            assert_rel_close(named[name].grad, p.grad, tol=1e-9, name=name)


def test_glow_classifier_bad_arguments():
    from revgrad.models import glow_classifier

    if not HAS_LAYERS:
        with pytest.raises(ImportError):
            glow_classifier()
        return
    with pytest.raises(ValueError):
        glow_classifier(coupling="nope")
    with pytest.raises(ValueError):
        glow_classifier(permutation="nope")


def test_revnet_rejects_odd_width():
    with pytest.raises(ValueError):
        RevNet((1,), (33,), strides=(1,))


@pytest.mark.skipif(not HAS_LAYERS, reason="revgrad.blocks.layers (ActNorm, Shuffle, Squeeze, ...) is not there yet")
def test_glow_classifier_defaults_first_step():
    """Default configuration, memory_saving=True from the builder, first step (ActNorm initializes)."""
    from revgrad.models import GlowClassifier, glow_classifier

    torch.manual_seed(5)
    saving = glow_classifier()
    assert isinstance(saving, GlowClassifier) and isinstance(saving.flow, revgrad.ReversibleSequential)
    assert len(saving.flow) == 2 * (1 + 4 * 3) and saving.fc.in_features == 16
    plain = glow_classifier(memory_saving=False)
    plain.load_state_dict(saving.state_dict())
    x = torch.randn(2, 1, 8, 8)
    results = []
    for model in (plain, saving):
        xx = x.clone().requires_grad_()
        out = model(xx)
        assert model.last_logdet is not None and model.last_logdet.shape == (2,)
        (nn.functional.cross_entropy(out, torch.tensor([4, 9])) - 1e-2 * model.last_logdet.mean()).backward()
        results.append((out, model.last_logdet, xx.grad))
    assert results[0][0].shape == (2, 10)
    for got, want, name in zip(results[1], results[0], ("logits", "logdet", "input grad")):
        assert_rel_close(got, want, tol=1e-4, name=name)
    named = dict(saving.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None:
            assert_rel_close(named[name].grad, p.grad, tol=1e-4, name=name)
    buffers = dict(saving.named_buffers())
    for name, b in plain.named_buffers():
        assert torch.equal(buffers[name], b), name
