"""MEFT: a pretrained transformer's layer stack made reversible for memory-efficient fine-tuning
(Liao, Tan & Monz 2023, "Make Your Pre-trained Model Reversible: From Parameter to Memory Efficient
Fine-Tuning").

Use, on a Hugging Face GPT-2 (``model = GPT2Model.from_pretrained(...)``; OPT and BERT alike)::

    body = meft_model(model.h, scale=0.1, adapter_dim=16)   # model.h frozen in place, adapters trainable
    h = model.wte(input_ids) + model.wpe(position_ids)      # [B, T, d]
    bias = attention_bias(padding_mask, causal=True, dtype=h.dtype)   # padding_mask [B, T]: 1 = token
    h = model.ln_f(body(h, attention_mask=bias))            # the hidden states model(...) would give
    optimizer = torch.optim.AdamW(body.trainable_parameters(), lr=1e-3)

MEFT runs two streams of hidden states through scaled additive couplings (:class:`revgrad.AdditiveCoupling`
on the last dimension of ``[B, T, 2d]``)::

    h1_n = lam * h1_{n-1} + F_n(h2_{n-1})          h2_{n-1} = (h2_n - G_n(h1_n)) / beta
    h2_n = beta * h2_{n-1} + G_n(h1_n)             h1_{n-1} = (h1_n - F_n(h2_{n-1})) / lam

with the pretrained model frozen and small adapters trainable. The paper's three architectures: MEFT1,
``F_n`` = pretrained layer ``n`` with an adapter, ``G_n`` = an adapter, ``lam`` small, ``beta = 1``;
MEFT2, the roles swapped (``beta`` small, ``lam = 1``); both switch the two streams between layers so
that the next layer reads the one just written. MEFT3, ``F_n`` = the attention sub-block of layer ``n``
and ``G_n`` its MLP sub-block, each with an adapter. Both streams start as the embedding output
``h_0``.

**The chain built here.** Switching streams after MEFT1's coupling makes the next layer write the
stream its ``G`` has just updated, from the same input; the two updates merge into one. Unrolled, MEFT1
is therefore the plain chain of couplings whose sub-networks are the pretrained layers themselves, two
per coupling, every write scaled by ``lam``::

    P1 <- lam * P1 + L_1(P2)        (coupling 1: f = layer 1, scale1 = lam)
    P2 <- lam * P2 + L_2(P1)        (           g = layer 2, scale2 = lam)
    P1 <- lam * P1 + L_3(P2)        (coupling 2: f = layer 3, ...)
    ...

(MEFT1's ``G_n`` adapters fold into the next layer's sub-network as ``lam * G_n``; MEFT2 gives the same
chain with ``beta`` in place of ``lam``, up to where adapters sit: they are one architecture). With the
adapters at zero this computes MEFT1's equations exactly (``tests/test_meft.py`` checks it against the
paper's recurrence, switch included, to 1e-10 in float64). ``kind="layers"`` builds it: ``ceil(N / 2)``
couplings for ``N`` layers, an odd last layer paired with a lone adapter ``g`` at ``scale2 = 1``
(MEFT1's ``G``, ``beta = 1``). ``kind="sublayers"`` builds MEFT3: one coupling per layer, ``f`` =
attention sub-block, ``g`` = MLP sub-block, both scales ``lam``. Every pretrained function (layer or
sub-block) ``P`` becomes ``P(x) + adapter(P(x))``; adapters are ``up(relu(down(z)))`` with
``down ~ N(0, adapter_std^2)`` and ``up = 0``, so they add exactly nothing at initialisation (MEFT
draws both from ``N(0, 0.02^2)``).

**Start and end.** The input ``h_0 [B, T, d]`` is duplicated, ``x = [h_0, h_0]`` (``[B, T, 2d]``),
and the output is the half the last pretrained function wrote (``kind="layers"``: the first half for an
odd number of layers, the second for an even one; ``kind="sublayers"``: the second, the MLP's).
Averaging the two halves would mix in the stream one layer behind.

**What is kept at initialisation, exactly.** Write ``L`` for the pretrained function a step applies,
``r`` for the stream it reads and ``w`` for the stream it overwrites. The step computes ``w <- lam * w +
L(r)``; the pretrained model computes ``L(r)``. The difference ``lam * w`` cannot be cancelled for ``lam
!= 0``: ``w`` holds an earlier hidden state (it must: the chain is invertible, so the state keeps what
the newer hidden state forgets), and ``L`` reads only ``r``; cancelling ``lam * w`` would need the
earlier state as a function of the later one, which a pretrained layer does not give. No choice of start
or end changes that, so the output at initialisation equals the pretrained one only to first order in
``lam`` (``out = pretrained + lam * D + O(lam^2)``, measured in the tests). What this module does to
make the first-order term small (``compensate=True``, the default): every pretrained function ``P``
becomes ``P(x) - lam * x``, so the carry ``lam * w`` stands in for ``lam`` of ``P``'s own identity path,
and the step computes ``L(r) + lam * (w - r)``. The error is then ``lam`` times the difference of two
consecutive hidden states (one residual branch's output in a pre-LN stack) rather than ``lam`` times a
whole hidden state, which a pre-LN residual stream carries on and adds up over the layers; the first
step is exact (``w = r = h_0``), so is a one-layer stack with ``kind="layers"``. Measured with ``python
bench/meft_scales.py`` (24 layers of width 64, random weights at realistic scale, float64, relative L2
error of the output at initialisation): GPT-2 (pre-LN) 2.6 published, 0.10 compensated at ``lam = 0.1``
(0.89 and 0.054 at 0.05); BERT (post-LN: each layer normalises its output, so the carries do not add up)
0.21 and 0.15 (0.11 and 0.079). At ``lam = 1`` neither keeps anything (a post-LN stack compensated
diverges): the scale must be small. ``compensate`` subtracts a fixed linear term: invertibility and the
``1 / lam`` conditioning are unchanged.

**Conditioning.** Each inverse step divides by ``lam``, so a rebuilt activation's rounding grows by
about ``1 / lam`` per pretrained function, compounding down the chain: on the 24-layer GPT-2 stack at
``lam = 0.1``, unchecked reversible backprop (``check="off"``) gets float32 gradients wrong by 5e14
(relative), while ``check="correct"`` (the default) corrects 3 of 12 couplings from anchors and stays at
3.6e-7 of plain autograd, float32's own level (bench table). ``check="off"`` suits float64, a few layers,
or ``lam`` near 1.

Shapes: ``MEFT.forward(hidden_states [B, T, d], attention_mask=None, **layer_kwargs) -> [B, T, d]``,
the hidden states after the last layer (before a final LayerNorm or head); ``attention_mask`` and
``layer_kwargs`` reach every pretrained layer (or attention sub-block) in every evaluation, forward and
backward, as the chain's extra arguments. Pass what the Hugging Face model passes to its layers: the
additive float mask ``[B, 1, T, T]`` that :func:`attention_bias` builds for eager and SDPA attention.

Supported layers: ``kind="layers"`` calls each layer as ``layer(h, attention_mask=..., **layer_kwargs)``
and takes the hidden states (the first item of a tuple), so any stack of layers that map
``[B, T, d] -> [B, T, d]`` works: GPT-2 (``model.h``), OPT (``model.decoder.layers``), BERT and RoBERTa
(``model.encoder.layer``; post-LN: the layer is used whole, LayerNorms included), and older
``transformers`` releases whose layers return tuples. ``kind="sublayers"`` knows GPT-2 blocks
(``ln_1, attn, ln_2, mlp``), OPT decoder layers (pre- and post-LN) and BERT-style layers
(``attention, intermediate, output``), and checks on a random input that its two sub-blocks reproduce
the layer. Cross-attention, KV caches and flash-attention's 2-D masks are not supported.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.couplings import AdditiveCoupling
from ..engine.backprop import CheckMode
from ..engine.sequential import PlainSequential, reversible

__all__ = ["MEFT", "AdaptedFunction", "Adapter", "attention_bias", "meft_model"]

Kind = Literal["layers", "sublayers"]


def _first(out: Any) -> torch.Tensor:
    """The hidden states of a layer's output: the tensor itself, or the first item of a tuple or of a
    ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return out[0]
    raise TypeError(f"revgrad.models.meft: a layer returned {type(out).__name__}, expected a tensor or a tuple")


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): ``up(relu(down(z)))``, ``[..., d] -> [..., d]``.

    ``down ~ N(0, std^2)`` with zero bias, ``up`` all zeros: the adapter adds exactly nothing until it is
    trained. Takes and ignores the chain's extra arguments (an attention mask) when it is a coupling's
    sub-network on its own.
    """

    def __init__(self, dim: int, bottleneck: int, *, std: float = 0.02, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, dim, dtype=dtype, device=device)
        with torch.no_grad():
            self.down.weight.normal_(0.0, std)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.up(torch.relu(self.down(z)))


class AdaptedFunction(nn.Module):
    """A sub-network of a MEFT coupling: ``z + adapter(z) - carry * x`` with ``z = pretrained(x, **kwargs)``.

    Args:
        pretrained: a frozen function ``[B, T, d] -> [B, T, d]`` (a whole layer or a sub-block), called
            with the chain's extra arguments (the attention mask).
        adapter: the trainable adapter on its output (``None``: none).
        carry: subtracted multiple of the input: the coupling's scale when compensating (see the
            module docstring), else 0.
    """

    def __init__(self, pretrained: nn.Module, adapter: Adapter | None, carry: float = 0.0) -> None:
        super().__init__()
        self.pretrained = pretrained
        self.adapter = adapter
        self.carry = float(carry)

    def extra_repr(self) -> str:
        return f"carry={self.carry:g}" if self.carry else ""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        z = self.pretrained(x, *args, **kwargs)
        if self.adapter is not None:
            z = z + self.adapter(z)
        return z - self.carry * x if self.carry else z


# -- pretrained functions: a whole layer, or one of its two sub-blocks ----------------------------------------


class _Layer(nn.Module):
    """A whole pretrained layer: ``layer(x, **kwargs)``, hidden states only."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _first(self.layer(x, *args, **kwargs))


class _PreNormAttention(nn.Module):
    """GPT-2: ``x + attn(ln_1(x), attention_mask=...)``."""

    def __init__(self, norm: nn.Module, attn: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.attn = attn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return x + _first(self.attn(self.norm(x), **kwargs))


class _PreNormMLP(nn.Module):
    """GPT-2: ``x + mlp(ln_2(x))``; ignores the attention mask."""

    def __init__(self, norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = mlp

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _OPTAttention(nn.Module):
    """OPT: ``x + dropout(attn(norm(x)))`` (pre-LN) or ``norm(x + dropout(attn(x)))`` (post-LN, OPT-350m)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.norm = layer.self_attn_layer_norm
        self.attn = layer.self_attn
        self.p = float(layer.dropout)
        self.pre = bool(layer.do_layer_norm_before)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        h = _first(self.attn(hidden_states=self.norm(x) if self.pre else x, **kwargs))
        h = x + F.dropout(h, p=self.p, training=self.training)
        return h if self.pre else self.norm(h)


class _OPTMLP(nn.Module):
    """OPT: ``x + dropout(fc2(act(fc1(norm(x)))))`` (pre-LN) or the same normalised after (post-LN)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.norm = layer.final_layer_norm
        self.fc1 = layer.fc1
        self.act = layer.activation_fn
        self.fc2 = layer.fc2
        self.p = float(layer.dropout)
        self.pre = bool(layer.do_layer_norm_before)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        h = self.fc2(self.act(self.fc1(self.norm(x) if self.pre else x)))
        h = x + F.dropout(h, p=self.p, training=self.training)
        return h if self.pre else self.norm(h)


class _BertAttention(nn.Module):
    """BERT/RoBERTa (post-LN): ``LayerNorm(x + attention(x))``, the layer's ``attention`` module whole."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return _first(self.attention(x, **kwargs))


class _BertMLP(nn.Module):
    """BERT/RoBERTa (post-LN): ``output(intermediate(x), x) = LayerNorm(x + dense(act(dense(x))))``."""

    def __init__(self, intermediate: nn.Module, output: nn.Module) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.output = output

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.output(self.intermediate(x), x)


def _has(layer: nn.Module, *names: str) -> bool:
    return all(hasattr(layer, n) for n in names)


def _sublayers(layer: nn.Module, index: int) -> tuple[nn.Module, nn.Module]:
    """``(attention sub-block, MLP sub-block)`` of a GPT-2, OPT or BERT-style layer, checked to reproduce it."""
    name = type(layer).__name__
    if getattr(layer, "crossattention", None) is not None:
        raise ValueError(f"revgrad.models.meft: layer {index} ({name}) has cross-attention, which kind='sublayers' "
                         "does not support")
    if _has(layer, "ln_1", "attn", "ln_2", "mlp"):
        parts: tuple[nn.Module, nn.Module] = (
            _PreNormAttention(layer.ln_1, layer.attn), _PreNormMLP(layer.ln_2, layer.mlp)
        )
    elif _has(layer, "self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm", "activation_fn",
              "do_layer_norm_before", "dropout"):
        parts = (_OPTAttention(layer), _OPTMLP(layer))
    elif _has(layer, "attention", "intermediate", "output"):
        parts = (_BertAttention(layer.attention), _BertMLP(layer.intermediate, layer.output))
    else:
        raise ValueError(
            f"revgrad.models.meft: kind='sublayers' knows GPT-2 blocks (ln_1, attn, ln_2, mlp), OPT decoder layers "
            f"and BERT-style layers (attention, intermediate, output); layer {index} ({name}) is none of them. "
            "kind='layers' uses any layer whole."
        )
    _check_split(layer, index, *parts)
    return parts


def _check_split(layer: nn.Module, index: int, attn: nn.Module, mlp: nn.Module) -> None:
    """Refuse a split whose ``mlp(attn(x))`` differs from ``layer(x)`` on a random input (eval mode, no
    mask, a private generator: the caller's random numbers and the modules' modes are left as they were)."""
    p = next(layer.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    dim = _hidden_size([layer])
    gen = torch.Generator(device=device).manual_seed(index)
    x = torch.randn(2, 5, dim, generator=gen, device=device, dtype=dtype)
    parts = [layer, attn, mlp]
    modes = [(m, m.training) for part in parts for m in part.modules()]
    try:
        for part in parts:
            part.eval()
        with torch.no_grad():
            whole = _first(layer(x))
            split = mlp(attn(x))
    finally:
        for m, mode in modes:
            m.training = mode
    tol = 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 3e-2
    err = float((split - whole).norm() / whole.norm().clamp_min(1e-30))
    if not err <= tol:
        raise ValueError(
            f"revgrad.models.meft: kind='sublayers' split layer {index} ({type(layer).__name__}) into attention and "
            f"MLP sub-blocks that do not reproduce it (relative error {err:.2g} on a random input); use kind='layers'"
        )


def _hidden_size(layers: Sequence[nn.Module]) -> int:
    """``d`` from the first LayerNorm of the first layer."""
    for module in layers[0].modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
    raise ValueError("revgrad.models.meft: cannot find the hidden size (no nn.LayerNorm in the first layer); "
                     "pass hidden_size=")


# -- the model ------------------------------------------------------------------------------------------------


class MEFT(nn.Module):
    """A pretrained layer stack made reversible (MEFT; see the module docstring for the math).

    Attributes:
        chain: the couplings (:class:`revgrad.AdditiveCoupling` on ``dim=-1``), a
            :class:`revgrad.ReversibleSequential` (``memory_saving=True``) or a
            :class:`revgrad.engine.sequential.PlainSequential` (plain autograd, same ``state_dict`` keys).
        hidden_size: ``d``; the chain runs on ``[B, T, 2d]``.
        readout: ``0`` or ``1``: the half of the chain's output returned (the stream the last pretrained
            function wrote).
        kind, scale: as given to :func:`meft_model`.

    Shapes: ``forward(hidden_states [B, T, d], attention_mask=None, **layer_kwargs) -> [B, T, d]``;
    ``attention_mask`` (``[B, 1, T, T]`` additive, :func:`attention_bias`) and ``layer_kwargs`` go to every
    pretrained layer or attention sub-block. After a backward, ``chain.last_report`` (memory saving) says
    what was checked and corrected.
    """

    def __init__(self, chain: nn.Sequential, hidden_size: int, readout: int, kind: Kind, scale: float) -> None:
        super().__init__()
        self.chain = chain
        self.hidden_size = hidden_size
        self.readout = readout
        self.kind = kind
        self.scale = scale

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, scale={self.scale:g}, hidden_size={self.hidden_size}, readout={self.readout}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **layer_kwargs: Any) -> torch.Tensor:
        d = self.hidden_size
        if hidden_states.dim() < 2 or hidden_states.shape[-1] != d:
            raise ValueError(
                f"revgrad.models.meft: expected hidden states [..., {d}], got {tuple(hidden_states.shape)}"
            )
        x = torch.cat([hidden_states, hidden_states], dim=-1)  # both streams start as h_0
        y = self.chain(x, attention_mask=attention_mask, **layer_kwargs)
        return y[..., :d] if self.readout == 0 else y[..., d:]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters (everything pretrained is frozen): what an optimizer should get."""
        return [p for p in self.parameters() if p.requires_grad]


def meft_model(
    layers: Iterable[nn.Module],
    *,
    kind: Kind = "layers",
    scale: float = 0.1,
    adapter_dim: int = 16,
    adapter_std: float = 0.02,
    compensate: bool = True,
    hidden_size: int | None = None,
    memory_saving: bool = True,
    check: CheckMode = "correct",
    **engine_options: Any,
) -> MEFT:
    """Make a pretrained transformer's layer stack reversible with trainable adapters (MEFT).

    Args:
        layers: the pretrained layers in order, e.g. a Hugging Face model's ``model.h`` (GPT-2),
            ``model.decoder.layers`` (OPT) or ``model.encoder.layer`` (BERT, RoBERTa). Used in place,
            not copied, and frozen (``requires_grad=False`` on all their parameters).
        kind: ``"layers"``: MEFT1 (= MEFT2), pretrained layers alternate between the two streams, two
            per coupling; any layer works. ``"sublayers"``: MEFT3, one coupling per layer with its
            attention sub-block as ``f`` and its MLP sub-block as ``g`` (GPT-2, OPT, BERT-style layers).
        scale: ``lam``, the factor on the stream each pretrained function overwrites (nonzero). Small
            keeps the output near the pretrained one at initialisation (first order in ``lam``) and
            makes the inverse amplify rounding by ``1 / lam`` per layer.
        adapter_dim: the adapters' bottleneck width; one adapter per pretrained function.
        adapter_std: standard deviation of the adapters' down-projections (their up-projections
            start at zero).
        compensate: subtract ``scale * x`` from every pretrained function, so the first-order error at
            initialisation is ``scale`` times the difference of consecutive hidden states instead of
            ``scale`` times a hidden state (module docstring). ``False``: MEFT as published.
        hidden_size: ``d`` (default: from the first ``nn.LayerNorm`` of the first layer).
        memory_saving: ``True``: the chain trains with revgrad's engine; ``False``: plain autograd
            (same model, same ``state_dict`` keys: the reference for gradients and memory).
        check: the engine's check, ``"correct"`` (default), ``"detect"`` or ``"off"``.
        **engine_options: more options of :func:`revgrad.reversible` (``tol``, ``anchor_every``, ``warn``,
            ``graph_budget``, ...).

    Returns:
        :class:`MEFT`: ``model(hidden_states [B, T, d], attention_mask=attention_bias(...)) -> [B, T, d]``.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("revgrad.models.meft: no layers given")
    if kind not in ("layers", "sublayers"):
        raise ValueError(f"revgrad.models.meft: kind must be 'layers' or 'sublayers', got {kind!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"revgrad.models.meft: scale must be a finite nonzero number, got {scale!r}")
    if isinstance(adapter_dim, bool) or not isinstance(adapter_dim, int) or adapter_dim < 1:
        raise ValueError(f"revgrad.models.meft: adapter_dim must be a positive integer, got {adapter_dim!r}")
    scale = float(scale)
    d = _hidden_size(layers) if hidden_size is None else int(hidden_size)
    for layer in layers:
        layer.requires_grad_(False)
    p = next((q for layer in layers for q in layer.parameters() if q.is_floating_point()), None)
    factory = {"dtype": p.dtype, "device": p.device} if p is not None else {}

    def adapted(pretrained: nn.Module) -> AdaptedFunction:
        adapter = Adapter(d, adapter_dim, std=adapter_std, **factory)
        return AdaptedFunction(pretrained, adapter, scale if compensate else 0.0)

    couplings: list[AdditiveCoupling] = []
    if kind == "layers":
        fns = [adapted(_Layer(layer)) for layer in layers]
        for k in range(0, len(fns), 2):
            if k + 1 < len(fns):
                couplings.append(AdditiveCoupling(fns[k], fns[k + 1], dim=-1, scale1=scale, scale2=scale))
            else:  # an odd last layer: MEFT1's G, a lone adapter at beta = 1
                couplings.append(AdditiveCoupling(fns[k], Adapter(d, adapter_dim, std=adapter_std, **factory),
                                                  dim=-1, scale1=scale, scale2=1.0))
        readout = 0 if len(layers) % 2 else 1
    else:
        for i, layer in enumerate(layers):
            attn, mlp = _sublayers(layer, i)
            couplings.append(AdditiveCoupling(adapted(attn), adapted(mlp), dim=-1, scale1=scale, scale2=scale))
        readout = 1
    model = MEFT(PlainSequential(*couplings), d, readout, kind, scale)
    model.train(layers[0].training)  # the adapters and sub-block wrappers start in the layers' mode
    if memory_saving:
        reversible(model, check=check, **engine_options)  # in place: the chain becomes a ReversibleSequential
    return model


def attention_bias(padding_mask: torch.Tensor, *, causal: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive attention mask Hugging Face layers take (eager and SDPA attention).

    Args:
        padding_mask: ``[B, T]``, nonzero (or ``True``) for tokens to attend to, zero for padding.
        causal: also hide later tokens (decoders: GPT-2, OPT); ``False`` for encoders (BERT).
        dtype: the dtype of the attention scores (the model's dtype; float32 under autocast).

    Returns:
        ``[B, 1, T, T]``: ``0`` where query ``i`` may attend to key ``j``, ``finfo(dtype).min`` elsewhere.
    """
    if padding_mask.dim() != 2:
        raise ValueError(f"revgrad.models.meft: padding_mask must be [B, T], got {tuple(padding_mask.shape)}")
    b, t = padding_mask.shape
    keep = padding_mask.bool()[:, None, None, :].expand(b, 1, t, t)
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=padding_mask.device).tril()
    bias = torch.zeros(b, 1, t, t, dtype=dtype, device=padding_mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)
