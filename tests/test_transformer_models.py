"""RevViT and the reversible causal LM against plain autograd (the same model with memory_saving=False)."""

from __future__ import annotations

import pytest
import torch
from reference import TOL, assert_rel_close
from torch import nn

import revgrad
from revgrad.models import rev_lm, rev_vit, rev_vit_base, rev_vit_small

TINY_VIT = {"img_size": 8, "patch_size": 4, "num_classes": 5, "dim": 8, "depth": 3, "heads": 2}
TINY_LM = {"vocab_size": 11, "dim": 8, "depth": 3, "heads": 2, "max_len": 12}


def pair(build, dtype, **options):
    """The memory-saving model and its plain twin with the same weights."""
    torch.manual_seed(0)
    saving = build(memory_saving=True, **options).to(dtype)
    plain = build(memory_saving=False, **{k: v for k, v in options.items() if k != "check"}).to(dtype)
    assert list(saving.state_dict()) == list(plain.state_dict()), "memory_saving must keep the state_dict keys"
    plain.load_state_dict(saving.state_dict())
    return saving, plain


def step_grads(model: nn.Module, inputs, seed: int = 3, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(*inputs, **kwargs)
    (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(saving, plain, inputs, dtype, **kwargs):
    out_s, g_s = step_grads(saving, inputs, **kwargs)
    out_p, g_p = step_grads(plain, inputs, **kwargs)
    assert_rel_close(out_s, out_p, TOL[dtype], name="output")
    assert set(g_s) == set(g_p) and g_p, "the same parameters must get gradients"
    for name in g_p:
        assert_rel_close(g_s[name], g_p[name], TOL[dtype], name=name)


@pytest.mark.parametrize("check", ["off", "correct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("fuse", ["mean", "concat"])
def test_rev_vit_matches_plain_autograd_with_dropout(check, dtype, fuse):
    saving, plain = pair(lambda **o: rev_vit(**TINY_VIT, dropout=0.1, fuse=fuse, **o), dtype, check=check)
    images = torch.randn(3, 3, 8, 8, dtype=dtype)
    assert_same_step(saving.train(), plain.train(), (images,), dtype)
    assert isinstance(saving.layers, revgrad.ReversibleSequential)
    assert saving.layers.last_report is not None


@pytest.mark.parametrize("check", ["off", "correct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_rev_lm_matches_plain_autograd_with_dropout(check, dtype):
    saving, plain = pair(lambda **o: rev_lm(**TINY_LM, dropout=0.1, **o), dtype, check=check)
    tokens = torch.randint(0, 11, (2, 7))
    assert_same_step(saving.train(), plain.train(), (tokens,), dtype)


def test_rev_lm_with_a_padding_mask_matches_plain_autograd():
    saving, plain = pair(lambda **o: rev_lm(**TINY_LM, **o), torch.float64)
    tokens = torch.randint(0, 11, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # the second sequence is padded at the end
    assert_same_step(saving, plain, (tokens,), torch.float64, attn_mask=mask)
    with torch.no_grad():  # the premise: the mask changes the logits of the padded sequence
        assert (saving(tokens, attn_mask=mask)[1, :5] - saving(tokens)[1, :5]).abs().max() < 1e-12
        assert (saving(tokens, attn_mask=mask)[1, 6] - saving(tokens)[1, 6]).abs().max() > 1e-6


def test_rev_lm_is_causal():
    torch.manual_seed(0)
    model = rev_lm(**TINY_LM).double().eval()
    tokens = torch.randint(0, 11, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 11
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 10, 11)
    assert (a[:, :6] - b[:, :6]).abs().max() < 1e-12, "a later token changed an earlier logit"
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6, "the change must show where it happened"


def test_rev_lm_ties_its_head_to_the_embedding():
    model = rev_lm(**TINY_LM)
    assert model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match="more than max_len"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize(("build", "paper"), [(rev_vit_small, 22e6), (rev_vit_base, 87e6)],
                         ids=["RevViT-S", "RevViT-B"])
def test_presets_match_the_papers_parameter_counts(build, paper):
    with torch.device("meta"):  # no memory, no initialisation cost
        model = build()
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / paper - 1) <= 0.05, f"{count / 1e6:.2f}M parameters vs the paper's {paper / 1e6:.0f}M"


@pytest.mark.parametrize("build", ["vit", "lm"])
def test_memory_is_flat_in_depth(build):
    from revgrad import MemoryProbe

    def held(depth: int) -> int:
        torch.manual_seed(0)
        if build == "vit":
            model = rev_vit(img_size=32, patch_size=4, num_classes=5, dim=64, depth=depth, heads=4, check="off")
            inputs = torch.randn(4, 3, 32, 32)
        else:
            model = rev_lm(vocab_size=50, dim=64, depth=depth, heads=4, max_len=64, check="off")
            inputs = torch.randint(0, 50, (4, 64))
        for _ in range(2):  # the second forward is measured (first-call caches warmed)
            model.zero_grad(set_to_none=True)
            with MemoryProbe() as probe:
                out = model(inputs)
                nbytes = probe.mark("held")
            out.square().mean().backward()
            del out
        return nbytes

    activation = 4 * 64 * 128 * 4  # one [4, 64 tokens, 2 x 64] float32 stream pair
    shallow, deep = held(2), held(8)
    assert deep - shallow < activation, f"6 more layers held {(deep - shallow) / activation:.2f} activations more"


def test_reversible_converts_a_plain_model_in_place():
    torch.manual_seed(0)
    model = rev_lm(**TINY_LM, memory_saving=False).double()
    assert type(model.layers) is revgrad.PlainSequential
    reference = rev_lm(**TINY_LM, memory_saving=False).double()
    reference.load_state_dict(model.state_dict())
    assert revgrad.reversible(model, check="detect") is model
    assert type(model.layers) is revgrad.ReversibleSequential and model.layers.config.check == "detect"
    assert_same_step(model, reference, (torch.randint(0, 11, (2, 7)),), torch.float64)
