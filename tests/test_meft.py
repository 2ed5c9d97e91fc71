"""MEFT conversion of Hugging Face layer stacks (``revgrad.models.meft``) against plain autograd.

Models come from small configurations with random weights (never downloaded); ``initializer_range=0.2``
makes each layer's residual branches matter (the default 0.02 leaves every layer close to the identity).
What is exact and what is first order at initialisation is explained in the module docstring of
:mod:`revgrad.models.meft`: the reversible model equals MEFT's equations exactly, and the pretrained
model to first order in the scale (exactly for a one-layer stack).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import pathlib

import pytest
import torch
from reference import TOL, assert_rel_close, rel_error, scalar_loss
from torch import nn

import revgrad
from revgrad.models import meft_model
from revgrad.models.meft import attention_bias

transformers = pytest.importorskip("transformers")
# Hugging Face imports its model code lazily, seconds per family on a loaded 2-core machine: at
# collection, not inside the first test that builds a model.
MODELS = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2Model),
    "bert": (transformers.BertConfig, transformers.BertModel),
    "opt": (transformers.OPTConfig, transformers.OPTModel),
}

B, T = 2, 6
D = 32
FAMILIES = ["gpt2", "bert", "opt"]
CAUSAL = {"gpt2": True, "bert": False, "opt": True}


def pretrained(family: str, n_layer: int, *, dropout: float = 0.0, dtype=torch.float64, seed: int = 0) -> nn.Module:
    """A Hugging Face base model (``GPT2Model``, ``BertModel``, ``OPTModel``) of width 32, random weights."""
    torch.manual_seed(seed)
    config, model_class = MODELS[family]
    if family == "gpt2":
        cfg = config(n_layer=n_layer, n_embd=D, n_head=2, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, initializer_range=0.2,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        model = model_class(cfg)
    elif family == "bert":
        cfg = config(num_hidden_layers=n_layer, hidden_size=D, num_attention_heads=2,
                                      intermediate_size=4 * D, vocab_size=100, max_position_embeddings=64,
                                      initializer_range=0.2, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout)
        model = model_class(cfg, add_pooling_layer=False)
    else:
        cfg = config(num_hidden_layers=n_layer, hidden_size=D, num_attention_heads=2,
                                     ffn_dim=4 * D, vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=D,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=1, init_std=0.2,
                                     dropout=dropout, attention_dropout=dropout)
        model = model_class(cfg)
    return model.to(dtype)


def layers_of(model: nn.Module) -> nn.ModuleList:
    for path in ("h", "encoder.layer", "decoder.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(type(model).__name__)


def inputs(family: str, dtype=torch.float64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``[B, T, D]`` and the layers' additive mask: sample 1 has two padding tokens (on the
    left for decoders, on the right for the encoder)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=gen, dtype=dtype)
    keep = torch.ones(B, T)
    if CAUSAL[family]:
        keep[1, :2] = 0
    else:
        keep[1, -2:] = 0
    return h, attention_bias(keep, causal=CAUSAL[family], dtype=dtype)


def run_layers(layers, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The pretrained stack as the Hugging Face model runs it."""
    for layer in layers:
        out = layer(h, attention_mask=mask)
        h = out[0] if isinstance(out, tuple) else out
    return h


def meft_equations(layers, h, mask, scale: float, compensate: bool) -> torch.Tensor:
    """MEFT1 as the paper writes it, adapters at zero: ``h1 <- lam h1 + F(h2)``, ``h2 <- h2 + G(h1)`` with
    ``G = 0``, then the streams switch; ``F(x) = layer(x) - c x`` (``c = lam`` when compensating, else 0).
    Both streams start as ``h``; the output is the stream the last layer wrote."""
    c = scale if compensate else 0.0
    h1, h2 = h, h
    for layer in layers:
        out = layer(h2, attention_mask=mask)
        h1 = scale * h1 + (out[0] if isinstance(out, tuple) else out) - c * h2
        h1, h2 = h2, h1
    return h2


def perturb_adapters(model: nn.Module, seed: int = 2) -> None:
    """Adapters as after some training (their up-projections start at zero, which would leave the
    down-projections without gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def twins(family: str, n_layer: int, *, dtype=torch.float64, dropout: float = 0.0, **options):
    """The same MEFT model twice: revgrad's engine and plain autograd (same parameters)."""
    base = pretrained(family, n_layer, dropout=dropout, dtype=dtype)
    rev = meft_model(layers_of(base), **options)
    perturb_adapters(rev)
    options = {k: v for k, v in options.items() if k != "check"}
    plain = meft_model(layers_of(copy.deepcopy(base)), memory_saving=False, **options)
    plain.load_state_dict(rev.state_dict())
    return rev, plain


def step(model: nn.Module, h: torch.Tensor, mask: torch.Tensor, autocast: bool = False):
    """One forward and backward; the gradients of the trainable parameters and of the input."""
    x = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, attention_mask=mask)
    scalar_loss(out).backward()
    return out.detach(), [p.grad for p in model.trainable_parameters()], x.grad


# -- what is kept at initialisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("compensate", [False, True], ids=["published", "compensated"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_output_at_init_is_meft_equations(family, compensate):
    """Before any step the reversible model computes MEFT's equations (streams switched after every
    layer) exactly: the merged chain of couplings is MEFT1, the mask reached every layer."""
    base = pretrained(family, 5)
    h, mask = inputs(family)
    with torch.no_grad():
        expected = meft_equations(layers_of(base), h, mask, 0.1, compensate)
        out = meft_model(layers_of(base), scale=0.1, compensate=compensate)(h, attention_mask=mask)
        unmasked = meft_model(layers_of(base), scale=0.1, compensate=compensate)(h, attention_mask=None)
    assert_rel_close(out, expected, 1e-10)
    assert rel_error(unmasked, expected) > 1e-3  # the premise: the mask matters


@pytest.mark.parametrize("family", FAMILIES)
def test_one_layer_keeps_the_pretrained_output(family):
    """One layer, compensated: the first step writes ``lam h + L(h) - lam h = L(h)``, the pretrained output
    (``kind="sublayers"`` takes two steps per layer: only its attention step is exact)."""
    base = pretrained(family, 1)
    h, mask = inputs(family)
    with torch.no_grad():
        expected = run_layers(layers_of(base), h, mask)
        out = meft_model(layers_of(base), scale=0.1)(h, attention_mask=mask)
        published = meft_model(layers_of(base), scale=0.1, compensate=False)(h, attention_mask=mask)
    assert_rel_close(out, expected, TOL[torch.float64])
    assert rel_error(published, expected) > 1e-3  # MEFT as published: lam * h_0 on top


@pytest.mark.parametrize("kind", ["layers", "sublayers"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_output_at_init_is_the_pretrained_one_to_first_order(family, kind):
    """Deeper stacks keep the pretrained output to first order in the scale (exactly is impossible for
    a nonzero scale, module docstring): the error shrinks tenfold with the scale."""
    base = pretrained(family, 4)
    h, mask = inputs(family)
    with torch.no_grad():
        expected = run_layers(layers_of(base), h, mask)
        errors = [rel_error(meft_model(layers_of(base), kind=kind, scale=s)(h, attention_mask=mask), expected)
                  for s in (1e-3, 1e-4)]
    assert errors[1] < 1e-3, errors
    assert 8 < errors[0] / errors[1] < 12, errors


# -- gradients against plain autograd -------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["off", "correct"])
@pytest.mark.parametrize("kind", ["layers", "sublayers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_plain_autograd_float64(family, kind, check):
    """Four pretrained functions (four layers, or two layers' attention and MLP sub-blocks) at ``lam = 0.1``:
    each inverse step amplifies rounding by ``1 / lam``, 1e4 over the chain, still far below 1e-10 in float64."""
    rev, plain = twins(family, 4 if kind == "layers" else 2, kind=kind, scale=0.1, check=check)
    h, mask = inputs(family)
    out, grads, gx = step(rev, h, mask)
    out_p, grads_p, gx_p = step(plain, h, mask)
    assert_rel_close(out, out_p, TOL[torch.float64], "output")
    assert_rel_close(gx, gx_p, TOL[torch.float64], "input gradient")
    for i, (a, b) in enumerate(zip(grads, grads_p, strict=True)):
        assert_rel_close(a, b, TOL[torch.float64], f"adapter parameter {i}")
    assert rev.chain.last_report.check == check


@pytest.mark.parametrize(("check", "scale"), [("correct", 0.1), ("off", 0.1), ("off", 1.0)])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_gradients_match_plain_autograd_float32(family, check, scale):
    """float32 at ``lam = 0.1``: the inverse amplifies rounding by ``1 / lam`` per layer, and
    ``check="correct"`` recomputes what drifted; ``check="off"`` holds on two layers (one coupling)."""
    rev, plain = twins(family, 4 if check == "correct" or scale == 1.0 else 2, dtype=torch.float32,
                       scale=scale, check=check)
    h, mask = inputs(family, dtype=torch.float32)
    _, grads, gx = step(rev, h, mask)
    _, grads_p, gx_p = step(plain, h, mask)
    assert_rel_close(torch.cat([gx.flatten(), *(g.flatten() for g in grads)]),
                     torch.cat([gx_p.flatten(), *(g.flatten() for g in grads_p)]), TOL[torch.float32])


def test_unchecked_float32_gradients_break_at_small_scale():
    """The premise of the float32 test: four layers at ``lam = 0.1`` without checks are off."""
    rev, plain = twins("gpt2", 8, dtype=torch.float32, scale=0.1, check="off")
    h, mask = inputs("gpt2", dtype=torch.float32)
    _, grads, _ = step(rev, h, mask)
    _, grads_p, _ = step(plain, h, mask)
    err = rel_error(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads_p]))
    assert err > 10 * TOL[torch.float32], err


def test_dropout_is_replayed():
    """Training mode with dropout (GPT-2's dropout modules; OPT's functional dropout, in its layer and in
    the sub-blocks): the same seed gives plain autograd's gradients, the engine replaying every mask."""
    for family, kind, n_layer in (("gpt2", "layers", 4), ("opt", "layers", 4), ("opt", "sublayers", 2)):
        rev, plain = twins(family, n_layer, dropout=0.1, scale=0.1, kind=kind)
        h, mask = inputs(family)
        grads = []
        for model in (rev, plain):
            model.train()
            torch.manual_seed(5)
            grads.append(step(model, h, mask)[1])
        for a, b in zip(*grads, strict=True):
            assert_rel_close(a, b, TOL[torch.float64], f"{family} {kind}")
        dropped = twins(family, n_layer, dropout=0.1, scale=0.1, kind=kind)[1]
        dropped.train()
        torch.manual_seed(6)  # the premise: another seed, other masks, other gradients
        assert rel_error(step(dropped, h, mask)[1][0], grads[1][0]) > 1e-3


def test_pretrained_weights_are_frozen_and_get_no_gradient():
    base = pretrained("gpt2", 3)
    model = meft_model(layers_of(base), adapter_dim=4)
    h, mask = inputs("gpt2")
    step(model, h, mask)
    frozen = list(layers_of(base).parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    trainable = model.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    assert {id(p) for p in trainable}.isdisjoint(id(p) for p in frozen)
    # two adapters per coupling (one lone adapter for the odd third layer), each down + up, weight + bias
    assert len(trainable) == 3 * 4 + 4
    assert sum(p.numel() for p in trainable) == 4 * (2 * D * 4 + 4 + D)


# -- masks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["layers", "sublayers"])
def test_causal_mask_reaches_every_layer_in_backward(kind):
    """A loss on the first three tokens gives the later tokens, and the padding, exactly zero gradient
    (every layer, every recomputation saw the mask), and changing later tokens leaves the first outputs
    as they were. (A padding token's own row is all masked: Hugging Face's layers then attend to every
    token, so the loss leaves padding outputs out.)"""
    rev, _ = twins("gpt2", 4, kind=kind, scale=0.1)
    h, mask = inputs("gpt2")  # sample 1: tokens 0 and 1 are padding
    x = h.clone().requires_grad_()
    out = rev(x, attention_mask=mask)
    (out[0, :3].square().sum() + out[1, 2:3].square().sum()).backward()
    assert torch.all(x.grad[:, 3:] == 0) and torch.all(x.grad[1, :2] == 0)
    assert x.grad[0, :3].abs().min() > 0 and x.grad[1, 2].abs().min() > 0
    with torch.no_grad():
        later = h.clone()
        later[:, 3:] += 1.0
        assert torch.equal(rev(later, attention_mask=mask)[0, :3], out[0, :3].detach())


def test_padding_mask_reaches_every_layer():
    """BERT with right padding: padding tokens change no other token's output or gradient."""
    rev, _ = twins("bert", 4, scale=0.1)
    h, mask = inputs("bert")
    x = h.clone().requires_grad_()
    out = rev(x, attention_mask=mask)
    out[1, :-2].square().sum().backward()
    assert torch.all(x.grad[1, -2:] == 0) and torch.all(x.grad[0] == 0)
    with torch.no_grad():
        moved = h.clone()
        moved[1, -2:] += 1.0
        assert torch.equal(rev(moved, attention_mask=mask)[1, :-2], out[1, :-2].detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_bias_is_what_the_model_gives_its_layers(family):
    """The whole Hugging Face model with a padding mask equals its embeddings, then its layers with
    :func:`attention_bias`, then its final LayerNorm (at the tokens that are not padding)."""
    base = pretrained(family, 2).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 100, (B, T), generator=gen)
    keep = torch.ones(B, T, dtype=torch.long)
    keep[1, :2] = 0  # left padding, as decoders are fed; the encoder gets the same
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=keep).last_hidden_state
        if family == "gpt2":
            h = base.wte(ids) + base.wpe(torch.arange(T))
            final = base.ln_f
        elif family == "bert":
            h = base.embeddings(input_ids=ids)
            final = nn.Identity()
        else:
            dec = base.decoder
            positions = (torch.cumsum(keep, dim=1) * keep - 1).clamp_min(0)  # OPT counts positions of real tokens
            h = dec.embed_tokens(ids) + dec.embed_positions(keep, position_ids=positions)
            final = dec.final_layer_norm
        out = final(run_layers(layers_of(base), h, attention_bias(keep, causal=CAUSAL[family], dtype=h.dtype)))
    real = keep.bool()
    assert_rel_close(out[real], expected[real], 1e-10)


# -- memory ---------------------------------------------------------------------------------------------------


def test_memory_is_flat_in_depth():
    """check="off": eight converted GPT-2 layers hold what two hold, give or take far less than one
    activation per added layer; plain autograd on the same model holds about 24 activations per layer."""
    from revgrad.tools.memory import MemoryProbe, cpu_counting_available

    if not cpu_counting_available():
        pytest.skip("needs glibc mallinfo2 to count bytes")
    batch, length, width = 4, 32, 64
    activation = batch * length * width * 4

    def held(n_layer: int, memory_saving: bool, runs: int = 2) -> int:
        torch.manual_seed(0)
        config, model_class = MODELS["gpt2"]
        cfg = config(n_layer=n_layer, n_embd=width, n_head=2, vocab_size=100, n_positions=length,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = meft_model(model_class(cfg).h, adapter_dim=8, check="off", memory_saving=memory_saving)
        h = torch.randn(batch, length, width)
        mask = attention_bias(torch.ones(batch, length), causal=True)
        for _ in range(runs):  # the last run is measured (first-call caches warmed)
            with MemoryProbe() as probe:
                out = model(h.clone().requires_grad_(), attention_mask=mask)
                nbytes = probe.mark("held")
            out.sum().backward()
            del out
        return nbytes

    two, eight = held(2, True), held(8, True)
    assert abs(eight - two) < 0.25 * activation, f"2 layers held {two / activation:.2f} activations, 8 held " \
                                                 f"{eight / activation:.2f}"
    plain = held(8, False, runs=1)
    assert plain > 8 * 6 * activation, f"plain autograd held only {plain / activation:.2f} activations at 8 layers: " \
                                       "the measurement is broken"


# -- construction ---------------------------------------------------------------------------------------------


def test_state_dict_and_structure():
    base = pretrained("gpt2", 3)
    rev = meft_model(layers_of(base), scale=0.05, adapter_dim=4)
    plain = meft_model(layers_of(copy.deepcopy(base)), scale=0.05, adapter_dim=4, memory_saving=False)
    assert isinstance(rev.chain, revgrad.ReversibleSequential)
    assert not isinstance(plain.chain, revgrad.ReversibleSequential)
    assert list(rev.state_dict()) == list(plain.state_dict())
    assert len(rev.chain) == 2 and rev.readout == 0  # ceil(3 / 2) couplings; three layers: the first half
    assert [(c.scale1, c.scale2) for c in rev.chain] == [(0.05, 0.05), (0.05, 1.0)]
    assert rev.chain[0].f.pretrained.layer is layers_of(base)[0]  # the layers themselves, not copies
    sub = meft_model(layers_of(base), kind="sublayers")
    assert len(sub.chain) == 3 and sub.readout == 1


def test_bad_arguments_are_named():
    layers = layers_of(pretrained("gpt2", 2))
    with pytest.raises(ValueError, match="scale must be a finite nonzero number"):
        meft_model(layers, scale=0.0)
    with pytest.raises(ValueError, match="kind must be"):
        meft_model(layers, kind="blocks")
    with pytest.raises(ValueError, match="adapter_dim must be a positive integer"):
        meft_model(layers, adapter_dim=0)
    with pytest.raises(ValueError, match="no layers"):
        meft_model([])
    with pytest.raises(ValueError, match=r"expected hidden states \[\.\.\., 32\]"):
        meft_model(layers)(torch.randn(2, 3, 16, dtype=torch.float64))

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x, **kwargs):
            return self.norm(x)

    with pytest.raises(ValueError, match=r"layer 0 \(Odd\) is none of them"):
        meft_model([Odd()], kind="sublayers")


def test_sublayers_that_do_not_reproduce_the_layer_are_refused():
    """A GPT-2-shaped block whose forward is not ``mlp(attn(x))``: the split is checked, not assumed."""
    layers = layers_of(pretrained("gpt2", 1))

    class Parallel(nn.Module):  # GPT-J style: attention and MLP read the same input
        def __init__(self, block):
            super().__init__()
            self.ln_1, self.attn, self.ln_2, self.mlp = block.ln_1, block.attn, block.ln_2, block.mlp

        def forward(self, x, attention_mask=None, **kwargs):
            h = self.ln_1(x)
            return x + self.attn(h, attention_mask=attention_mask)[0] + self.mlp(h)

    with pytest.raises(ValueError, match="do not reproduce it"):
        meft_model([Parallel(layers[0])], kind="sublayers")


def test_benchmark_script_runs():
    """``bench/meft_scales.py`` at tiny size: a row per scale, precision and check."""
    path = pathlib.Path(__file__).parents[1] / "bench" / "meft_scales.py"
    spec = importlib.util.spec_from_file_location("meft_scales", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main(["--depth", "2", "--width", "16", "--length", "4", "--batch", "2", "--scales", "1", "0.1"])
    assert len(rows) == 2 * 2 * 2
    assert all(math.isfinite(r["error"]) or r["check"] == "off" for r in rows)
    assert all(r["error"] <= 1e-5 for r in rows if r["check"] == "correct" and r["precision"] == "float32")
