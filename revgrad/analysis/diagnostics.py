"""Stability diagnostics for reversible chains: reconstruction errors, local and analytic Lipschitz constants.

:func:`stability_report` measures, per block and for the whole chain, on a batch ``x``:

* ``recon_error`` / ``recon_error_mean``: the relative reconstruction error
  ``||F^-1(F(x)) - x|| / ||x||`` per sample, max and mean over the batch (``inf`` for a sample whose
  reconstruction has a NaN or Inf);
* ``nonfinite``: the share of NaN/Inf elements in the reconstruction;
* ``lip_forward`` / ``lip_inverse``: local Lipschitz estimates, the largest singular value of the
  Jacobian of ``F`` at ``x`` and of ``F^-1`` at ``F(x)``, by power iteration with ``torch.func.jvp``
  and ``torch.func.vjp`` (per sample; max over the batch). They are lower bounds of the true local
  constants (a few iterations); ``inf`` where the Jacobian-vector products are not finite (the map
  overflows or yields NaN at that point);
* ``bound_forward`` / ``bound_inverse``: analytic global bounds where the block type has one, None
  otherwise (see :func:`lipschitz_bound`).

Everything runs in eval mode (training flags restored afterwards). Samples must not interact in
eval mode (BatchNorm uses running statistics then), so that the batched Jacobian is block diagonal.

:func:`ood_probes` makes out-of-distribution inputs shaped like ``x`` from a private, seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..blocks.couplings import AdditiveCoupling, AffineCoupling
from ..engine.protocol import block_type, require_blocks

__all__ = ["BlockStability", "StabilityReport", "lipschitz_bound", "ood_probes", "stability_report"]


@dataclass
class BlockStability:
    """One row of a :class:`StabilityReport` (one block, or the whole chain)."""

    name: str
    recon_error: float  # max over the batch of ||F^-1(F(x)) - x|| / ||x|| per sample
    recon_error_mean: float  # mean over the batch
    nonfinite: float  # share of NaN/Inf elements in the reconstruction
    lip_forward: float  # local estimate at x: max over the batch of sigma_max(J_F(x))
    lip_inverse: float  # local estimate at F(x): max over the batch of sigma_max(J_F^-1(F(x)))
    bound_forward: float | None  # analytic global bound, None when unknown / unbounded
    bound_inverse: float | None


@dataclass
class StabilityReport:
    """Per-block rows (``blocks``, in chain order) and one row for the whole chain (``total``)."""

    blocks: list[BlockStability] = field(default_factory=list)
    total: BlockStability | None = None

    def to_dict(self) -> dict:
        """Plain Python data: ``{"blocks": [row, ...], "total": row}`` with rows as dicts."""
        return {
            "blocks": [asdict(b) for b in self.blocks],
            "total": asdict(self.total) if self.total is not None else None,
        }

    def __str__(self) -> str:
        header = ("block", "recon max", "recon mean", "nonfinite", "lip fwd", "lip inv", "bound fwd", "bound inv")
        rows = [
            (
                r.name,
                _fmt(r.recon_error),
                _fmt(r.recon_error_mean),
                _fmt(r.nonfinite),
                _fmt(r.lip_forward),
                _fmt(r.lip_inverse),
                _fmt(r.bound_forward),
                _fmt(r.bound_inverse),
            )
            for r in [*self.blocks, *([self.total] if self.total is not None else [])]
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        for i, row in enumerate(rows):
            if self.total is not None and i == len(rows) - 1:
                lines.append("  ".join("-" * w for w in widths))
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}"


# --------------------------------------------------------------------------------------------------
# Evaluation helpers


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def _forward(block: nn.Module, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
    return _first(block(x, *args, **(kwargs or {})))


def _inverse(block: nn.Module, y: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
    return _first(block.inverse(y, *args, **(kwargs or {})))


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1).to(torch.float64), dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _recon(x: torch.Tensor, rec: torch.Tensor) -> tuple[float, float, float]:
    """(max, mean) over the batch of the relative error per sample, and the share of non-finite elements."""
    err = _per_sample_norm(rec - x) / _per_sample_norm(x).clamp_min(torch.finfo(torch.float64).tiny)
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)  # NaN in a sample: infinitely off
    nonfinite = float((~torch.isfinite(rec)).double().mean()) if rec.numel() else 0.0
    return float(err.max()), float(err.mean()), nonfinite


def _local_lipschitz(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iterations: int, generator: torch.Generator
) -> float:
    """Max over the batch of the largest singular value of ``fn``'s per-sample Jacobian at ``x``.

    Power iteration alternating ``u = J v / |J v|`` (jvp) and ``w = J^T u`` (vjp), ``sigma = |w|``;
    it never forms ``J^T J v``, so a Jacobian of norm 1e30 does not overflow float32.
    """
    x = x.detach()
    v = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    v = v / _bcast(_per_sample_norm(v).clamp_min(1e-300), v)
    sigma = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    with torch.enable_grad():  # vjp needs autograd inside; blocks pick their graph-friendly path
        _, vjp_fn = torch.func.vjp(fn, x)
        for _ in range(max(1, iterations)):
            _, jv = torch.func.jvp(fn, (x,), (v,))
            jv = jv.detach()
            n = _per_sample_norm(jv)
            u = jv / _bcast(n.clamp_min(1e-300), jv)
            (w,) = vjp_fn(u)
            w = w.detach()
            sigma = _per_sample_norm(w)
            if not bool(torch.isfinite(sigma).all()):  # the Jacobian is not finite here (overflow, NaN)
                sigma = torch.where(torch.isfinite(sigma), sigma, torch.full_like(sigma, math.inf))
                break
            v = w / _bcast(sigma.clamp_min(1e-300), w)
    return float(sigma.max())


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


# --------------------------------------------------------------------------------------------------
# Analytic bounds


def _conv_bound(conv: nn.modules.conv._ConvNd) -> float | None:
    """An upper bound on a convolution's operator norm (bias ignored; any input size).

    With zero or circular padding, the conv is ``sum_k shift_k(W_k x)`` over the kernel offsets
    ``k``, each shift (with stride and dilation) of norm <= 1, so ``||conv|| <= sum_k sigma(W_k)``;
    also each input element enters at most ``K`` windows, so ``||conv|| <= sqrt(K) sigma(W_mat)``
    with ``W_mat: [C_out, C_in K]``. The smaller of the two is returned; with groups, the max over
    groups (the operator is block diagonal in the groups). Transposed convs and reflect/replicate
    padding: None.
    """
    if getattr(conv, "transposed", False) or conv.padding_mode not in ("zeros", "circular"):
        return None
    w = conv.weight.detach().to(torch.float64)
    g = conv.groups
    c_out, c_in_g = w.shape[0], w.shape[1]
    k = int(math.prod(w.shape[2:]))
    wg = w.reshape(g, c_out // g, c_in_g, k)
    per_offset = torch.linalg.matrix_norm(wg.permute(0, 3, 1, 2), ord=2)  # [g, k]
    sum_bound = per_offset.sum(dim=1).max()
    mat_bound = torch.linalg.matrix_norm(wg.reshape(g, c_out // g, c_in_g * k), ord=2).max() * math.sqrt(k)
    return float(torch.minimum(sum_bound, mat_bound))


_ONE_LIPSCHITZ = (nn.ReLU, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.Hardtanh, nn.ReLU6)


def lipschitz_bound(module: nn.Module) -> float | None:
    """An analytic upper bound on the Lipschitz constant of a sub-network (eval mode), or None.

    Known: ``nn.Sequential`` (product), ``Linear`` (spectral norm), ``Conv1d/2d/3d`` (see
    :func:`_conv_bound`), ReLU/ReLU6/Tanh/Hardtanh/Identity/Dropout (1), LeakyReLU (``max(1, |slope|)``),
    Sigmoid (1/4), BatchNorm with running statistics (``max |gamma| / sqrt(var + eps)``). Any other
    layer: None.
    """
    if isinstance(module, nn.Sequential):
        total = 1.0
        for child in module:
            b = lipschitz_bound(child)
            if b is None:
                return None
            total *= b
        return total
    if isinstance(module, nn.Linear):
        return float(torch.linalg.matrix_norm(module.weight.detach().to(torch.float64), ord=2))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_bound(module)
    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_var is None:  # uses batch statistics even in eval: samples interact
            return None
        scale = torch.rsqrt(module.running_var.detach().to(torch.float64) + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach().to(torch.float64).abs()
        return float(scale.max())
    return None


def _block_bounds(block: nn.Module) -> tuple[float | None, float | None]:
    """Analytic ``(Lip forward, Lip inverse)`` of a block, None where there is none or it is unknown."""
    bounds = getattr(block, "lipschitz_bounds", None)
    if callable(bounds):
        fwd, inv = bounds()
        return (None if fwd is None else float(fwd)), (None if inv is None else float(inv))
    if isinstance(block, AdditiveCoupling):
        lf, lg = lipschitz_bound(block.f), lipschitz_bound(block.g)
        if lf is None or lg is None:
            return None, None
        # Each half-step is (identity on one half) + (scaled half + sub-network): Lip <= max(1, |s|) + Lip.
        # The inverse half-steps divide by the scales. Scales 1 give (1 + Lip f)(1 + Lip g) both ways.
        s1, s2 = abs(block.scale1), abs(block.scale2)
        fwd = (max(1.0, s1) + lf) * (max(1.0, s2) + lg)
        inv = (max(1.0, 1.0 / s1) + lf / s1) * (max(1.0, 1.0 / s2) + lg / s2)
        return fwd, inv
    if isinstance(block, AffineCoupling):
        # sigmoid / exp: the inverse divides by an unbounded-below scale and x2 * s is unbounded on
        # unbounded inputs: no global bound. "bounded": s in (1/bound, bound) but y2 = (x2 + shift) s
        # has d y2 / d x1 = (x2 + shift) ds/dx1, unbounded in x2: no global bound either.
        return None, None
    return None, None


def _product(values: list[float | None]) -> float | None:
    total = 1.0
    for v in values:
        if v is None:
            return None
        total *= v
    return total


# --------------------------------------------------------------------------------------------------
# Public API


def _blocks_of(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        children = require_blocks(model, f"revgrad.stability_report ({type(model).__name__})", "child")
        if not children:
            raise TypeError("revgrad.stability_report: the chain is empty")
        return children
    if not callable(getattr(model, "inverse", None)):
        raise TypeError(
            f"revgrad.stability_report: {type(model).__name__} has no inverse; pass a ReversibleSequential "
            "or a block (an nn.Module with forward and inverse)"
        )
    return [model]


def stability_report(
    model: nn.Module, x: torch.Tensor, *args, iterations: int = 10, seed: int = 0, **kwargs
) -> StabilityReport:
    """Measure reconstruction errors and Lipschitz constants of ``model``'s blocks on the batch ``x``.

    Args:
        model: a ``ReversibleSequential`` (or ``nn.Sequential`` of blocks): one row per child; any other
            module with ``forward`` and ``inverse`` is one block.
        x: a batch ``[B, ...]`` (the first dim is the batch; any layout: ``[B, C]``, ``[B, T, C]``,
            ``[B, C, H, W]``).
        *args, **kwargs: the chain's extra arguments (a condition, a mask), given to every block's
            ``forward`` and ``inverse`` as the chain would; the Lipschitz estimates are with respect
            to ``x`` (the arguments held fixed).
        iterations: power iterations for the local Lipschitz estimates (each costs one jvp and one vjp).
        seed: seeds the start vectors (a private generator; the global RNG is not touched).

    The whole chain (``total``) is evaluated as the composition of its children (the engine plays no
    part without autograd): ``F^-1`` is the children's inverses in reverse order, applied to ``F(x)``.
    Its bounds are the products of the blocks' bounds (None when any is None).
    """
    blocks = _blocks_of(model)
    gen = torch.Generator(device=x.device).manual_seed(seed)

    def chain_fwd(h: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = _forward(b, h, args, kwargs)
        return h

    def chain_inv(h: torch.Tensor) -> torch.Tensor:
        for b in reversed(blocks):
            h = _inverse(b, h, args, kwargs)
        return h

    report = StabilityReport()
    with _eval_mode(model), torch.no_grad():
        h = x.detach()
        for i, block in enumerate(blocks):
            y = _forward(block, h, args, kwargs)
            rmax, rmean, nonfinite = _recon(h, _inverse(block, y, args, kwargs))
            lip_f = _local_lipschitz(lambda t, b=block: _forward(b, t, args, kwargs), h, iterations, gen)
            lip_i = _local_lipschitz(lambda t, b=block: _inverse(b, t, args, kwargs), y, iterations, gen)
            bf, bi = _block_bounds(block)
            report.blocks.append(
                BlockStability(f"{i} ({block_type(block)})", rmax, rmean, nonfinite, lip_f, lip_i, bf, bi)
            )
            h = y
        y = h
        rmax, rmean, nonfinite = _recon(x.detach(), chain_inv(y))
        lip_f = _local_lipschitz(chain_fwd, x.detach(), iterations, gen)
        lip_i = _local_lipschitz(chain_inv, y, iterations, gen)
        report.total = BlockStability(
            "total",
            rmax,
            rmean,
            nonfinite,
            lip_f,
            lip_i,
            _product([r.bound_forward for r in report.blocks]),
            _product([r.bound_inverse for r in report.blocks]),
        )
    return report


def ood_probes(x: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Out-of-distribution inputs shaped like ``x`` (same dtype and device), from a private seeded generator.

    ``"gaussian"``: N(0, 1) times ``x``'s std; ``"rademacher"``: +-1 times ``x``'s std (same scale as
    the data); ``"scaled_2x"``, ``"scaled_10x"``: ``x`` times 2 and 10. The global RNG is not touched.
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x = x.detach()
    std = x.to(torch.float64).std().item() if x.numel() > 1 else 1.0
    gaussian = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32) * std
    signs = torch.randint(0, 2, x.shape, generator=gen, device=x.device).to(torch.float32) * 2.0 - 1.0
    return {
        "gaussian": gaussian.to(x.dtype),
        "rademacher": (signs * std).to(x.dtype),
        "scaled_2x": x * 2.0,
        "scaled_10x": x * 10.0,
    }
