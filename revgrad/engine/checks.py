"""What a check compares: the relative error of two fingerprints, how forward stores fingerprints
compactly, the default tolerances, and the requests by which a block computes the fingerprint of its
input inside its own kernel pass.

The fingerprint itself (random projections of an activation) is an op: :mod:`revgrad.ops.fingerprint`.

Stored fingerprints: residues, not values
-----------------------------------------
A check only asks whether the rebuilt fingerprint ``f'`` is within ``tol * ||f||`` of the stored ``f``.
So forward keeps, per sample ``b``, the exponent ``e_b`` of ``max_j |f_bj|`` (``2^(e-1) <= max < 2^e``)
and, per direction ``j``, ``f_bj`` on the grid ``delta_b = 2^(e_b - P)`` modulo ``2^16``:

    c_bj = round(f_bj / delta_b) mod 2^16        (int16)          e_b + 128   (uint8)

Backward measures, in units of the grid, ``d_bj = (f'_bj / delta_b - c_bj)`` wrapped into
``[-2^15, 2^15)``: the difference itself wherever ``|f'_bj - f_bj| < 2^15 delta_b``, and the error is
``||d_b|| / ||u_b||`` with ``u_b = f'_b / delta_b`` (so ``||f' - f|| / ||f'||``), the denominator
clamped to ``[2^(P-3), sqrt(8) 2^P]``, what the stored scale allows. A sample whose ``max_j |f_bj|``
is below 1e-3 of the batch's mean is stored on the grid of that floor instead (measured against the
batch's scale, as :func:`relative_error` measures near-zero samples: rounding in a batch statistic
must not become a false alarm on an all-zero sample).
``P`` follows the tolerance: ``2^-P`` is the power of two in ``(tol / 566, tol / 283]``, so for every ``tol``:

- *resolution*: the stored rounding moves the measured error by at most ``sqrt(8) 2^-P <= tol / 100``
  (relative: ``||f|| >= max_j |f_bj| >= 2^(e-1)``; for a sample stored on the batch's floor, relative
  to that floor: ``tol / 12``);
- *range*: an error below ``2^15 delta_b`` in every direction is measured exactly, and since
  ``||f|| <= sqrt(8) 2^e``, every error up to ``2^15 2^-P / sqrt(8) >= 20 tol`` (relative) is;
- *larger errors* wrap: each residue lands anywhere in its range of ``2^16 delta_b``, independently
  across directions, and the error passes only if all 8 land within ``tol sqrt(8) 2^e`` of the right
  value: at most the volume of that 8-ball over the cube, ``4.06 (tol sqrt(8) 2^P / 2^16)^8 <=
  4.06 / 41^8 ~ 5e-13`` per sample. A rebuilt fingerprint that grew would shrink the measured error
  through its larger norm: the denominator's clamp keeps a grown sample's wrapped residue measured
  against the stored scale; one that shrank (to 0) is measured against 1/8 of its least.

The bound holds for a check at the tolerance the grid was made for and degrades fast for looser ones
(the 8th power: at 20 tol about one wrapped residue in 80 would pass), so a row is never checked
against more than its own tolerance (:meth:`FingerprintStore.limit`): a probe that loosens a
tolerance after forward takes effect from the next forward on.

17 bytes per sample and block instead of 32 (8 float32 values): what matters for small samples (a
64-value sample is 256 bytes). A sample whose fingerprint was not finite, or beyond ``2^127`` or below
``2^-127`` in magnitude (activations outside float32's range: a float64 chain with a tolerance of
1e-6 or more), is stored with exponent code 0, whose scale is infinite: every check of it fails (NaN
never passes; ``"correct"`` recomputes such inputs, ``"detect"`` raises), never passes wrongly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "MEASURED_EXACTLY",
    "FingerprintRequest",
    "FingerprintStore",
    "default_tol",
    "grid_bits",
    "relative_error",
    "requesting",
    "take_request",
]


def relative_error(rebuilt: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Largest per-sample relative distance between two fingerprints ``[..., B, m]``: a tensor ``[...]``
    (0-dim for one pair; +inf where any sample is non-finite).

    A sample whose fingerprint is (near) zero is measured against the batch's mean norm instead, so
    an all-zero sample cannot turn rounding noise into a false alarm.
    """
    diff = torch.linalg.vector_norm(rebuilt - stored, dim=-1)
    norm = torch.linalg.vector_norm(stored, dim=-1)
    floor = norm.mean(-1, keepdim=True) * 1e-3 + torch.finfo(norm.dtype).tiny
    err = diff / torch.maximum(norm, floor)
    # A reduction may drop NaN on some backends: NaN becomes +inf first, which any max keeps (and
    # which fails every check as NaN would).
    return err.nan_to_num(nan=math.inf, posinf=math.inf).amax(-1)


# -- stored fingerprints (see the module docstring) --------------------------------------------------

# Errors up to this many tolerances are measured exactly (see above); larger ones may be reported as
# a lower bound (a wrapped residue), and fail.
MEASURED_EXACTLY = 20
_WRAP = 65536.0  # residues modulo 2^16, stored as int16
_HALF = 32768.0


def grid_bits(tol: float, directions: int = 8) -> int:
    """``P``: the grid ``2^(e - P)`` on which fingerprints are stored for tolerance ``tol``, the
    smallest with ``sqrt(directions) * 2^-P <= tol / 100`` (at most 50: a float64 fingerprint's own
    rounding is ~1e-16 relative)."""
    return max(1, min(50, math.ceil(math.log2(100 * math.sqrt(directions) / tol))))


# Below this tolerance (float64 chains) fingerprints are kept as float64 values. 16-bit residues span
# a factor 2048 between their range and their resolution: enough for one tolerance, not for the
# probes' tightening by 1000x and more, which float64 fingerprints resolve (float32 ones do not:
# their own rounding, ~1e-7, is that of the values kept before, float32).
_EXACT_BELOW = 1e-6


@dataclass
class _Group:
    """Rows stacked in one store: float64 values (``exact``), or int16 residues ``[rows, B, m]`` and
    uint8 exponent codes ``[rows, B]`` on grids of ``bits[row]``."""

    exact: bool
    bits: list[int]
    tensors: tuple[torch.Tensor, ...] = ()


def _encode(fps: torch.Tensor, bits: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    peak = fps.abs().amax(-1)  # [rows, B]
    finite = torch.isfinite(peak)
    # Near-zero samples go on the grid of 1e-3 of the batch's mean (of the finite samples).
    floor = torch.where(finite, peak, 0.0).mean(-1, keepdim=True) * 1e-3
    _, e = torch.frexp(torch.maximum(peak, floor))
    # Outside what the code holds, a sample gets code 0 with the non-finite ones: it fails every check.
    finite &= (e >= -127) & (e <= 127)
    code = e.clamp(-127, 127).add_(128).long()
    # f / delta = f * 2^(P - e), from the table backward decodes with (a lookup and a product: ldexp
    # and remainder cost ~10x as much on CPU).
    u = fps * _row_scales(tuple(bits), fps.device).gather(1, code).unsqueeze(-1)  # |u| < 2^P
    codes = _wrap(u.round_()).sub_(_HALF).to(torch.int16)
    return codes, torch.where(finite, code, 0).to(torch.uint8)


def _wrap(v: torch.Tensor) -> torch.Tensor:
    """``v mod 2^16`` in ``[0, 2^16)``, exactly in float64 (a scaling by a power of two, a floor, and a
    difference of two floats within a factor 2 of each other or below 2^17), as ``torch.remainder``
    would give it at a tenth of its cost on CPU."""
    return v.sub(torch.floor(v * (1.0 / _WRAP)).mul_(_WRAP))


@functools.lru_cache(maxsize=64)
def _scales(bits: int, device: torch.device) -> torch.Tensor:
    """``[256]`` float64: ``1 / delta = 2^(P - e)`` for exponent code ``e + 128``; code 0 (a fingerprint
    that was not finite) is +inf, which makes every check of that sample NaN, then +inf."""
    e = torch.arange(256, dtype=torch.float64) - 128
    return torch.exp2(bits - e).index_fill_(0, torch.tensor([0]), math.inf).to(device)


@functools.lru_cache(maxsize=64)
def _row_scales(bits: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[rows, 256]``: :func:`_scales` of each row's grid (expanded, not copied, for one grid)."""
    if len(set(bits)) == 1:
        return _scales(bits[0], device).expand(len(bits), 256)
    return torch.stack([_scales(b, device) for b in bits])


class FingerprintStore:
    """The fingerprints of a chain's block inputs as forward keeps them (module docstring).

    Built from forward's float64 ``[B, m]`` fingerprints and the tolerance each block's check had then;
    row ``k`` is the ``k``-th fingerprint in forward order. Rows of one shape share a stacked store.
    """

    def __init__(self, groups: list[_Group], where: list[tuple[int, int]], tols: list[float]) -> None:
        self.groups = groups
        self.where = where
        self.tols = tols
        self._inverse: dict[int, torch.Tensor] = {}  # per group: 1 / delta, [rows, B, 1] float64

    def _inverse_deltas(self, g: int) -> torch.Tensor:
        """``1 / delta`` of every sample of group ``g`` (made once per backward, when first needed:
        one lookup for all rows instead of one per check)."""
        inverse = self._inverse.get(g)
        if inverse is None:
            group = self.groups[g]
            codes = group.tensors[1].long()
            inverse = self._inverse[g] = _row_scales(tuple(group.bits), codes.device).gather(1, codes).unsqueeze(-1)
        return inverse

    @classmethod
    def encode(cls, fps: list[torch.Tensor], tols: list[float]) -> FingerprintStore:
        by_kind: dict[tuple, list[int]] = {}
        for k, (f, t) in enumerate(zip(fps, tols)):
            by_kind.setdefault((not t >= _EXACT_BELOW, f.shape, f.device), []).append(k)
        groups: list[_Group] = []
        where: list[tuple[int, int]] = [(0, 0)] * len(fps)
        for (exact, _, _), ks in by_kind.items():
            stacked = torch.stack([fps[k] for k in ks])
            if exact:
                group = _Group(True, [], (stacked,))
            else:
                bits = [grid_bits(tols[k], stacked.shape[-1]) for k in ks]
                group = _Group(False, bits, _encode(stacked, bits))
            where_g = len(groups)
            groups.append(group)
            for row, k in enumerate(ks):
                where[k] = (where_g, row)
        return cls(groups, where, list(tols))

    def take_tensors(self) -> list[torch.Tensor]:
        """The stored tensors (for ``save_for_backward``); the store keeps only their layout."""
        out = [t for g in self.groups for t in g.tensors]
        for g in self.groups:
            g.tensors = ()
        return out

    def put_tensors(self, tensors: tuple[torch.Tensor, ...]) -> FingerprintStore:
        """A store with the tensors :meth:`take_tensors` gave (as ``ctx.saved_tensors`` returns them)."""
        groups, at = [], 0
        for g in self.groups:
            count = 1 if g.exact else 2
            groups.append(_Group(g.exact, g.bits, tuple(tensors[at : at + count])))
            at += count
        return FingerprintStore(groups, self.where, self.tols)

    def limit(self, k: int) -> float:
        """The loosest tolerance row ``k`` can be checked against: the one its grid was made for (a
        looser check would let wrapped residues of large errors pass, module docstring)."""
        g, _ = self.where[k]
        return math.inf if self.groups[g].exact else self.tols[k]

    def error(self, k: int, rebuilt: torch.Tensor) -> torch.Tensor:
        """Largest per-sample relative error of ``rebuilt`` (float64 ``[B, m]``) against row ``k``: a
        0-dim tensor, +inf if any sample is not finite (as :func:`relative_error`)."""
        g, row = self.where[k]
        group = self.groups[g]
        if group.exact:
            return relative_error(rebuilt, group.tensors[0][row])
        bits = group.bits[row]
        return _residue_error(rebuilt, self._inverse_deltas(g)[row], group.tensors[0][row],
                              *_norm_range(bits, rebuilt.shape[-1]))

    def errors(self, rows: list[int], rebuilt: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`error` of ``rebuilt[j]`` against row ``rows[j]`` for every ``j``, as one float64
        tensor ``[len(rows)]``, computed with a few ops per group of rows instead of per row (deferred
        checks settle every block's error at once: on small samples per-op overhead is their cost)."""
        by_group: dict[int, list[int]] = {}
        for j, k in enumerate(rows):
            by_group.setdefault(self.where[k][0], []).append(j)
        parts, order = [], []
        for g, js in by_group.items():
            group = self.groups[g]
            idx = [self.where[rows[j]][1] for j in js]
            whole = idx == list(range(group.tensors[0].shape[0]))  # every row, in order: no gather
            f = torch.stack([rebuilt[j] for j in js])  # [n, B, m]
            if group.exact:
                parts.append(relative_error(f, group.tensors[0] if whole else group.tensors[0][idx]))
            else:
                bits = [group.bits[r] for r in idx]
                if len(set(bits)) == 1:
                    low, high = _norm_range(bits[0], f.shape[-1])
                else:
                    b = torch.tensor(bits, dtype=torch.float64, device=f.device)[:, None]
                    low, high = _norm_range(b, f.shape[-1])
                inverse = self._inverse_deltas(g)
                codes = group.tensors[0]
                parts.append(_residue_error(f, inverse if whole else inverse[idx], codes if whole else codes[idx],
                                            low, high))
            order += js
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        if order != list(range(len(rows))):
            out = out[torch.tensor(order, device=out.device).argsort()]
        return out


def _norm_range(bits, directions: int):
    """The clamp of ``||u||`` in units of the grid: ``[2^(P-3), sqrt(m) 2^P]`` (module docstring)."""
    return 2.0 ** (bits - 3), math.sqrt(directions) * 2.0**bits


def _residue_error(rebuilt: torch.Tensor, inverse: torch.Tensor, codes: torch.Tensor, low, high) -> torch.Tensor:
    """Largest per-sample relative error of rebuilt fingerprints ``[..., B, m]`` against stored residues
    ``codes`` on grids ``1 / inverse`` (``[..., B, 1]``): a tensor ``[...]``."""
    # Few ops on [B, 8] tensors: this runs once per checked block in backward, where per-op overhead
    # is most of its cost on small samples.
    u = rebuilt * inverse  # f' / delta
    # (u - c - 2^15) mod 2^16 - 2^15 = (u - stored residue) wrapped into [-2^15, 2^15)
    d = _wrap(u - codes).sub_(_HALF)
    norm = torch.linalg.vector_norm(u, dim=-1).clamp(low, high)
    err = torch.linalg.vector_norm(d, dim=-1).div_(norm)
    return err.nan_to_num(nan=math.inf, posinf=math.inf).amax(-1)


_TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 4e-3,
}


def default_tol(dtype: torch.dtype) -> float:
    """Default relative tolerance for a chain computing in ``dtype`` (the autocast dtype when on).

    See ``docs/architecture.md`` ("Tolerances") for the measurement behind these values.
    """
    return _TOL.get(dtype, 1e-5)


# --------------------------------------------------------------------------------------------------
# Fused fingerprints: a block whose kernel reads (forward) or writes (backward) the tensor anyway can
# fingerprint it in the same pass. The engine opens a request around the call; the block takes it.


@dataclass
class FingerprintRequest:
    """The engine asks for the fingerprint of ``target`` (forward: the block input; backward: None,
    meaning the input the block rebuilds). A block that computes it stores it in ``value``."""

    target: torch.Tensor | None
    value: torch.Tensor | None = None


_REQUEST: contextvars.ContextVar[FingerprintRequest | None] = contextvars.ContextVar(
    "revgrad_fingerprint_request", default=None
)


@contextlib.contextmanager
def requesting(request: FingerprintRequest | None) -> Iterator[FingerprintRequest | None]:
    """Make ``request`` the one a block call may take (the engine wraps each block call)."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def take_request(target: torch.Tensor | None) -> FingerprintRequest | None:
    """For a block: the engine's request if it is for ``target`` (None outside the engine).

    Taking clears it, so sub-networks, and blocks nested in them, never see it.
    """
    request = _REQUEST.get()
    if request is None:
        return None
    _REQUEST.set(None)
    return request if request.target is target else None
