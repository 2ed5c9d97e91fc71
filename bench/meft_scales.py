"""MEFT's scale ``lambda`` (``revgrad.models.meft``): gradient error of reversible backprop against plain autograd.

A GPT-2 layer stack (``transformers.GPT2Config``, random weights, never downloaded) converted with
``revgrad.models.meft`` runs one step on hidden states ``[B, T, d]`` with a causal mask. Weights are
scaled to be realistic rather than near the identity (GPT-2's 0.02 initialisation at this width): every
matrix of the layers is ``N(0, gain^2 / fan_in)``, so each residual branch adds about as much as the
stream carries and the hidden states grow over depth, as in trained models. Adapters start as MEFT
draws them (both projections ``N(0, 0.02^2)``).

For each ``lambda`` and precision (float32; bf16 autocast), plain autograd on the same converted model
(``memory_saving=False``) is the reference; the table gives the relative L2 error of revgrad's gradients
over all trainable (adapter) parameters with ``check="off"`` and ``check="correct"``, the blocks
corrected, and plain autograd's own error against float64 (the precision's floor). A second table gives
the output at initialisation (adapters at zero) against the pretrained stack, in float64, for MEFT as
published and compensated, on that GPT-2 stack and on a BERT stack (post-LN) of the same size.

    python bench/meft_scales.py                 # 24 layers, d 64, lambda 1, 0.1, 0.05
    python bench/meft_scales.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch
from torch import nn

import revgrad
from revgrad.models import attention_bias, meft_model


def base_model(args: argparse.Namespace, family: str = "gpt2") -> nn.Module:
    """The layers of a GPT-2 (pre-LN) or BERT (post-LN) stack with realistic weight scales (float32)."""
    import transformers

    torch.manual_seed(args.seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=args.depth, n_embd=args.width, n_head=args.heads, vocab_size=100, n_positions=max(args.length, 8),
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        layers = transformers.GPT2Model(cfg).h
    else:
        cfg = transformers.BertConfig(
            num_hidden_layers=args.depth, hidden_size=args.width, num_attention_heads=args.heads,
            intermediate_size=4 * args.width, vocab_size=100, max_position_embeddings=max(args.length, 8),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        layers = transformers.BertModel(cfg, add_pooling_layer=False).encoder.layer
    with torch.no_grad():
        for p in layers.modules():
            weight = getattr(p, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                fan_in = weight.shape[0] if type(p).__name__ == "Conv1D" else weight.shape[1]  # Conv1D: [in, out]
                weight.normal_(0.0, args.gain / math.sqrt(fan_in))
                bias = getattr(p, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.normal_(0.0, 0.02)
    return layers


def converted(layers: nn.Module, scale: float, args, dtype: torch.dtype, **options) -> nn.Module:
    model = meft_model(copy.deepcopy(layers).to(dtype), kind=args.kind, scale=scale, adapter_dim=args.adapter_dim,
                       **options)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            if p.dim() == 2:  # MEFT's initialisation: both projections N(0, 0.02^2)
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return model


def gradients(model: nn.Module, h: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, autocast: bool):
    x = h.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, attention_mask=mask)
    (out.float() * weights.to(out.device, torch.float32)).sum().backward()
    grads = torch.cat([p.grad.flatten().double() for p in model.trainable_parameters()])
    model.zero_grad(set_to_none=True)
    return grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.1, 0.05])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--gain", type=float, default=1.0)
    parser.add_argument("--adapter-dim", type=int, default=16)
    parser.add_argument("--kind", choices=["layers", "sublayers"], default="layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    layers = base_model(args)
    gen = torch.Generator().manual_seed(args.seed + 2)
    h = torch.randn(args.batch, args.length, args.width, generator=gen, dtype=torch.float64)
    weights = torch.randn(args.batch, args.length, args.width, generator=gen) / math.sqrt(h.numel())
    keep = torch.ones(args.batch, args.length)
    print(f"torch {torch.__version__}, revgrad {revgrad.__version__}, GPT-2 layers: {args.depth} (kind={args.kind!r}), "
          f"d {args.width}, {args.heads} heads, x [{args.batch}, {args.length}, {args.width}], gain {args.gain}, "
          f"adapter dim {args.adapter_dim}, seed {args.seed}, causal mask, one thread")

    rows: list[dict] = []
    for scale in args.scales:
        truth_model = converted(layers, scale, args, torch.float64, memory_saving=False)
        truth = gradients(truth_model, h, attention_bias(keep, causal=True, dtype=torch.float64), weights, False)
        for precision, autocast in (("float32", False), ("bf16 autocast", True)):
            mask = attention_bias(keep, causal=True, dtype=torch.float32)
            x = h.float()
            plain = gradients(converted(layers, scale, args, torch.float32, memory_saving=False), x, mask, weights,
                              autocast)
            for check in ("off", "correct"):
                model = converted(layers, scale, args, torch.float32, check=check)
                grads = gradients(model, x, mask, weights, autocast)
                report = model.chain.last_report
                rows.append({
                    "scale": scale, "precision": precision, "check": check, "error": rel(grads, plain),
                    "plain_vs_float64": rel(plain, truth),
                    "corrected": None if check == "off" else len(report.corrected), "blocks": len(model.chain),
                })

    print()
    print("| lambda | precision | plain vs float64 | check | revgrad vs plain | blocks corrected |")
    print("|---:|---|---:|---|---:|---:|")
    for r in rows:
        corrected = "-" if r["corrected"] is None else f"{r['corrected']} of {r['blocks']}"
        print(f"| {r['scale']:g} | {r['precision']} | {r['plain_vs_float64']:.2g} | {r['check']} | {r['error']:.2g} | "
              f"{corrected} |")

    print()
    print("Output at initialisation (adapters at zero) against the pretrained stack, float64, relative L2:")
    print()
    print("| stack | lambda | MEFT as published | compensated (default) |")
    print("|---|---:|---:|---:|")
    for family, causal in (("GPT-2 (pre-LN)", True), ("BERT (post-LN)", False)):
        stack = base_model(args, "gpt2" if causal else "bert").double()
        mask64 = attention_bias(keep, causal=causal, dtype=torch.float64)
        with torch.no_grad():
            expected = h
            for layer in stack:
                out = layer(expected, attention_mask=mask64)
                expected = out[0] if isinstance(out, tuple) else out
            for scale in args.scales:
                errs = []
                for compensate in (False, True):
                    model = meft_model(copy.deepcopy(stack), kind=args.kind, scale=scale, compensate=compensate)
                    errs.append(rel(model(h, mask64), expected))
                print(f"| {family} | {scale:g} | {errs[0]:.2g} | {errs[1]:.2g} |")
                for r in rows:
                    if r["scale"] == scale:
                        r[f"init_error_{family.split()[0].lower()}"] = {"published": errs[0], "compensated": errs[1]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
