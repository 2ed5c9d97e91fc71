"""Reversible transformers: RevViT (Mangalam et al., CVPR 2022) and a causal language model.

Both keep two streams of ``d`` features, carried together as ``h = [x1, x2]: [B, T, 2d]``, and each
layer is one additive coupling split along the last dimension (``AdditiveCoupling(F, G, dim=-1)``)::

    y1 = x1 + F(x2)        F = pre-LN multi-head self-attention
    y2 = x2 + G(y1)        G = pre-LN MLP (Linear -> GELU -> Linear)

so a layer's input is rebuilt from its output in backward (``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``)
and activation memory does not grow with depth. The streams start as two copies of the embedded
tokens and are averaged at the end (``(x1 + x2) / 2``, RevViT's "average" fusion; ``fuse="concat"``
keeps both), then a final LayerNorm and the head.

Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (causal for the language model,
``is_causal=True``); attention dropout is drawn inside ``F`` and replayed in backward like any dropout.
An attention mask (``attn_mask``, boolean, True = attend, broadcastable to ``[B, heads, T, T]``) is passed
to every layer as the chain's extra argument.

``memory_saving=True`` runs the layers through :class:`revgrad.ReversibleSequential`; ``False``
through :class:`revgrad.PlainSequential` (plain autograd, the same ``state_dict`` keys).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.couplings import AdditiveCoupling
from ..engine.sequential import PlainSequential, ReversibleSequential

__all__ = [
    "MLP",
    "RevLM",
    "RevViT",
    "SelfAttention",
    "rev_lm",
    "rev_vit",
    "rev_vit_base",
    "rev_vit_small",
]

Fuse = Literal["mean", "concat"]


class SelfAttention(nn.Module):
    """Pre-LN multi-head self-attention: ``LayerNorm -> qkv -> attention -> proj -> dropout``.

    Shapes: ``x: [B, T, dim] -> [B, T, dim]``; ``attn_mask``: boolean (True: attend) broadcastable to
    ``[B, heads, T, T]``, combined with the causal mask when ``causal``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"revgrad: SelfAttention needs dim divisible by heads, got {dim} and {heads}")
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        is_causal = self.causal and attn_mask is None
        if self.causal and attn_mask is not None:
            attn_mask = attn_mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.drop(self.proj(o.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    """Pre-LN MLP: ``LayerNorm -> Linear(dim, hidden) -> GELU -> Linear(hidden, dim) -> dropout``.

    Shapes: ``x: [B, T, dim] -> [B, T, dim]``; ``attn_mask`` is accepted and ignored (every layer of a
    chain is given the chain's extra arguments).
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


def _layers(
    dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, causal: bool,
    memory_saving: bool, check: str,
) -> nn.Sequential:
    hidden = int(dim * mlp_ratio)
    layers = [
        AdditiveCoupling(SelfAttention(dim, heads, dropout, causal), MLP(dim, hidden, dropout), dim=-1)
        for _ in range(depth)
    ]
    if memory_saving:
        return ReversibleSequential(*layers, check=check)
    return PlainSequential(*layers)


def _fuse(h: torch.Tensor, fuse: Fuse) -> torch.Tensor:
    """The two streams ``[B, T, 2d]`` as one: their mean ``[B, T, d]`` or both ``[B, T, 2d]``."""
    if fuse == "concat":
        return h
    x1, x2 = h.chunk(2, dim=-1)
    return (x1 + x2) / 2


def _check_fuse(fuse: str) -> None:
    if fuse not in ("mean", "concat"):
        raise ValueError(f"revgrad: fuse must be 'mean' or 'concat', got {fuse!r}")


class RevViT(nn.Module):
    """Reversible Vision Transformer (Mangalam et al., CVPR 2022).

    Patch embedding (a ``patch_size`` strided convolution) plus learned positions, two streams of
    ``dim`` features through ``depth`` reversible layers, the streams fused (``"mean"`` or
    ``"concat"``), LayerNorm, mean over patches, linear head.

    Shapes: ``x: [B, in_channels, img_size, img_size] -> logits [B, num_classes]``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_classes: int = 1000,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        in_channels: int = 3,
        fuse: Fuse = "mean",
        memory_saving: bool = True,
        check: str = "correct",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"revgrad: RevViT needs img_size divisible by patch_size, got {img_size}, {patch_size}")
        _check_fuse(fuse)
        self.fuse = fuse
        patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layers = _layers(dim, depth, heads, mlp_ratio, dropout, False, memory_saving, check)
        width = 2 * dim if fuse == "concat" else dim
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        h = self.layers(torch.cat([tokens, tokens], dim=-1))
        return self.head(self.norm(_fuse(h, self.fuse)).mean(dim=1))


class RevLM(nn.Module):
    """A decoder-only causal language model with reversible layers (Reformer-style two streams).

    Token and learned position embeddings, dropout, ``depth`` reversible layers with causal
    attention, the streams fused, LayerNorm, and a linear head tied to the token embedding
    (``tie_weights``; untied for ``fuse="concat"``).

    Shapes: ``tokens: [B, T]`` (int64, ``T <= max_len``) -> logits ``[B, T, vocab_size]``;
    ``attn_mask``: optional boolean ``[B, T]`` (False: a padding key nobody attends to) or any boolean
    mask broadcastable to ``[B, heads, T, T]``, combined with the causal mask.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        depth: int = 6,
        heads: int = 4,
        max_len: int = 256,
        dropout: float = 0.0,
        mlp_ratio: float = 4.0,
        fuse: Fuse = "mean",
        tie_weights: bool = True,
        memory_saving: bool = True,
        check: str = "correct",
    ) -> None:
        super().__init__()
        _check_fuse(fuse)
        self.fuse = fuse
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.layers = _layers(dim, depth, heads, mlp_ratio, dropout, True, memory_saving, check)
        width = 2 * dim if fuse == "concat" else dim
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        if tie_weights and fuse == "mean":
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"revgrad: RevLM got {t} tokens, more than max_len={self.max_len}")
        h = self.drop(self.embed(tokens) + self.pos_embed(torch.arange(t, device=tokens.device)))
        h = torch.cat([h, h], dim=-1)
        if attn_mask is None:
            h = self.layers(h)
        else:
            if attn_mask.dim() == 2:  # [B, T] key padding -> [B, 1, 1, T]
                attn_mask = attn_mask[:, None, None, :]
            h = self.layers(h, attn_mask=attn_mask.to(torch.bool))
        return self.head(self.norm(_fuse(h, self.fuse)))


def rev_vit(
    img_size: int = 224,
    patch_size: int = 16,
    num_classes: int = 1000,
    dim: int = 768,
    depth: int = 12,
    heads: int = 12,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
    *,
    memory_saving: bool = True,
    check: str = "correct",
    **kwargs,
) -> RevViT:
    """RevViT; the defaults are RevViT-B/16 (87M parameters). See :class:`RevViT`."""
    return RevViT(img_size, patch_size, num_classes, dim, depth, heads, mlp_ratio, dropout,
                  memory_saving=memory_saving, check=check, **kwargs)


def rev_vit_small(num_classes: int = 1000, **kwargs) -> RevViT:
    """RevViT-S/16: dim 384, depth 12, 6 heads (22M parameters, as in the paper)."""
    return rev_vit(num_classes=num_classes, **{"dim": 384, "depth": 12, "heads": 6, **kwargs})


def rev_vit_base(num_classes: int = 1000, **kwargs) -> RevViT:
    """RevViT-B/16: dim 768, depth 12, 12 heads (87M parameters, as in the paper)."""
    return rev_vit(num_classes=num_classes, **{"dim": 768, "depth": 12, "heads": 12, **kwargs})


def rev_lm(
    vocab_size: int,
    dim: int = 256,
    depth: int = 6,
    heads: int = 4,
    max_len: int = 256,
    dropout: float = 0.0,
    *,
    memory_saving: bool = True,
    check: str = "correct",
    **kwargs,
) -> RevLM:
    """A reversible causal language model; see :class:`RevLM`."""
    return RevLM(vocab_size, dim, depth, heads, max_len, dropout, memory_saving=memory_saving, check=check,
                 **kwargs)
