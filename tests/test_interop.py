"""Blocks from memcnn and FrEIA inside ``revgrad.reversible``: same values and gradients as plain autograd."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from chains import assert_unstable
from reference import assert_rel_close, plain_chain, scalar_loss
from torch import nn

import revgrad
from revgrad.blocks.interop import FrEIABlock, freia_blocks

CHECKS = ["off", "detect", "correct"]


def _import_quietly(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # memcnn: torch.cuda.amp.custom_fwd deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip(name)


def fc(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out))


def conv(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, c_out, 3, padding=1))


def assert_same_gradients(blocks: list[nn.Module], x: torch.Tensor, check: str) -> None:
    """Forward, loss and every gradient of ``reversible(blocks)`` equal those of plain autograd."""
    ref_blocks = copy.deepcopy(blocks)
    x_ref = x.clone().requires_grad_()
    out_ref = plain_chain(ref_blocks, x_ref)
    scalar_loss(out_ref).backward()

    chain = revgrad.reversible(blocks, check=check)
    x_rev = x.clone().requires_grad_()
    out = chain(x_rev)
    scalar_loss(out).backward()

    if isinstance(out_ref, tuple):
        assert isinstance(out, tuple)
        assert_rel_close(out[0], out_ref[0], name="y")
        assert_rel_close(out[1], out_ref[1], name="logdet")
    else:
        assert_rel_close(out, out_ref, name="y")
    assert_rel_close(x_rev.grad, x_ref.grad, name="input grad")
    ref_params = dict(nn.ModuleList(ref_blocks).named_parameters())
    n = 0
    for name, p in nn.ModuleList(blocks).named_parameters():
        if not p.requires_grad:
            continue
        n += 1
        assert_rel_close(p.grad, ref_params[name].grad, name=name)
    assert n > 0


# -- memcnn --------------------------------------------------------------------------------------


def memcnn_chain(memcnn, channels: int, image: bool) -> list[nn.Module]:
    half = channels // 2
    sub = conv if image else fc
    return [
        memcnn.AdditiveCoupling(sub(half, half), sub(half, half)),
        memcnn.AffineCoupling(sub(half, half), sub(half, half), adapter=memcnn.AffineAdapterNaive),
        memcnn.AdditiveCoupling(sub(half, half)),  # Gm=None: memcnn deep-copies Fm
        memcnn.AffineCoupling(sub(half, 2 * half), sub(half, 2 * half), adapter=memcnn.AffineAdapterSigmoid),
    ]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("image", [False, True], ids=["flat", "image"])
def test_memcnn_couplings_match_plain_autograd(check, image):
    memcnn = _import_quietly("memcnn")
    torch.manual_seed(0)
    blocks = [b.double() for b in memcnn_chain(memcnn, 4, image)]
    assert all(revgrad.is_block(b) for b in blocks)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) if image else torch.randn(5, 4, dtype=torch.float64)
    assert_same_gradients(blocks, x, check)


@pytest.mark.filterwarnings("ignore:Other implementations than the default:DeprecationWarning")
@pytest.mark.parametrize("implementation", [0, 1])
def test_memcnn_own_autograd_functions_inside_the_chain(implementation):
    """memcnn's implementation 0/1 (its own autograd Functions) also work as blocks."""
    memcnn = _import_quietly("memcnn")
    torch.manual_seed(0)
    blocks = [
        memcnn.AdditiveCoupling(fc(2, 2), fc(2, 2), implementation_fwd=implementation,
                                implementation_bwd=implementation).double()
        for _ in range(3)
    ]
    assert_same_gradients(blocks, torch.randn(5, 4, dtype=torch.float64), "correct")


def test_memcnn_chain_inverse_round_trip():
    memcnn = _import_quietly("memcnn")
    torch.manual_seed(1)
    chain = revgrad.reversible([b.double() for b in memcnn_chain(memcnn, 4, image=True)])
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_rel_close(chain.inverse(chain(x)), x, name="x")


# -- FrEIA ---------------------------------------------------------------------------------------

SHAPES = {"flat": (6,), "image": (4, 5, 5)}


def freia_modules(Fm, kind: str, shape: tuple[int, ...]) -> list[nn.Module]:
    sub = conv if len(shape) == 3 else fc
    if kind == "glow":
        return [Fm.GLOWCouplingBlock([shape], subnet_constructor=sub, clamp=1.5)]
    if kind == "allinone":
        return [Fm.AllInOneBlock([shape], subnet_constructor=sub, affine_clamping=1.5)]
    if kind == "permute":
        return [Fm.PermuteRandom([shape], seed=3)]
    if kind == "actnorm":
        return [Fm.ActNorm([shape])]
    if kind == "mixed":
        return [
            Fm.ActNorm([shape]),
            Fm.GLOWCouplingBlock([shape], subnet_constructor=sub),
            Fm.PermuteRandom([shape], seed=1),
            Fm.AllInOneBlock([shape], subnet_constructor=sub),
            Fm.AllInOneBlock(
                [shape], subnet_constructor=sub, reverse_permutation=True, learned_householder_permutation=2
            ),
            Fm.GLOWCouplingBlock([shape], subnet_constructor=sub, clamp_activation="TANH"),
        ]
    raise ValueError(kind)


def _x(shape, seed: int = 0, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kind", ["glow", "allinone", "permute", "actnorm"])
def test_freia_block_round_trip_and_logdet(kind, shape):
    Fm = _import_quietly("FrEIA.modules")
    torch.manual_seed(0)
    module = freia_modules(Fm, kind, shape)[0].double()
    reference = copy.deepcopy(module)  # ActNorm initialises on its first batch: both see the same one
    block = FrEIABlock(module)
    assert revgrad.is_block(block)
    x = _x(shape)
    with torch.no_grad():
        y, logdet = block(x)
        (y_ref,), jac_ref = reference([x], rev=False, jac=True)
        assert_rel_close(y, y_ref, name="y")
        assert logdet.shape == (x.shape[0],)
        assert_rel_close(logdet, torch.as_tensor(jac_ref, dtype=x.dtype).expand(x.shape[0]), tol=1e-12,
                         name="logdet")
        assert_rel_close(block.inverse(y), x, tol=1e-12, name="x")
        # FrEIA's convention: rev=True returns -log_jac_det
        (_,), jac_rev = reference([y_ref], rev=True, jac=True)
        assert_rel_close(-torch.as_tensor(jac_rev, dtype=x.dtype).expand(x.shape[0]), logdet, tol=1e-12,
                         name="-jac_rev")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kind", ["glow", "allinone", "permute", "mixed"])
def test_freia_blocks_match_plain_autograd(kind, shape, check):
    Fm = _import_quietly("FrEIA.modules")
    torch.manual_seed(0)
    modules = [m.double() for m in freia_modules(Fm, kind, shape)]
    blocks = [FrEIABlock(m) for m in modules]
    if kind == "permute":  # no parameters of its own: put it between couplings
        sub = conv if len(shape) == 3 else fc
        blocks = [
            FrEIABlock(Fm.GLOWCouplingBlock([shape], subnet_constructor=sub).double()),
            *blocks,
            FrEIABlock(Fm.GLOWCouplingBlock([shape], subnet_constructor=sub).double()),
        ]
    assert_same_gradients(blocks, _x(shape, seed=2), check)


def test_freia_soft_permutation_inverse_is_float32_accurate_and_corrected():
    """AllInOneBlock(permute_soft=True) builds its rotation as a FloatTensor: after .double() its
    transpose inverts it only to ~1e-7, so fp64 reconstruction drifts; "detect" says so and
    "correct" still gives plain autograd's gradients."""
    Fm = _import_quietly("FrEIA.modules")
    shape = (6,)

    def blocks():
        torch.manual_seed(0)
        return [FrEIABlock(Fm.AllInOneBlock([shape], subnet_constructor=fc, permute_soft=True).double())
                for _ in range(3)]

    x = _x(shape, seed=5).requires_grad_()
    # Premise: the float32 rotation's defect (~eps32 / 3, whatever the machine) puts each rebuilt input
    # ~4e-8 off, 40x the float64 tolerance 1e-9.
    assert_unstable(nn.Sequential(*blocks()), x, revgrad.default_tol(torch.float64), margin=10)
    with pytest.raises(revgrad.ReconstructionError, match="FrEIABlock"):
        scalar_loss(revgrad.reversible(blocks(), check="detect")(x)).backward()
    assert_same_gradients(blocks(), _x(shape, seed=5), "correct")


def test_freia_sequence_inn_through_reversible():
    Ff = _import_quietly("FrEIA.framework")
    Fm = _import_quietly("FrEIA.modules")
    torch.manual_seed(0)
    shape = (4, 5, 5)
    inn = Ff.SequenceINN(*shape)
    inn.append(Fm.AllInOneBlock, subnet_constructor=conv)
    inn.append(Fm.PermuteRandom, seed=0)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=conv)
    inn.double()
    reference = copy.deepcopy(inn)
    chain = revgrad.reversible(freia_blocks(inn))
    # same parameter objects and names, under the blocks' "module." prefix
    assert {id(p) for p in chain.parameters()} == {id(p) for p in inn.parameters()}

    x = _x(shape, seed=4)
    x_ref = x.clone().requires_grad_()
    z_ref, jac_ref = reference(x_ref)
    scalar_loss((z_ref, jac_ref)).backward()
    x_rev = x.clone().requires_grad_()
    z, logdet = chain(x_rev)
    scalar_loss((z, logdet)).backward()
    assert_rel_close(z, z_ref, name="z")
    assert_rel_close(logdet, jac_ref, name="logdet")
    assert_rel_close(x_rev.grad, x_ref.grad, name="input grad")
    for (name, p), p_ref in zip(inn.named_parameters(), reference.parameters()):
        if p.requires_grad:
            assert_rel_close(p.grad, p_ref.grad, name=name)
    with torch.no_grad():
        assert_rel_close(chain.inverse(z), x, tol=1e-12, name="x")
