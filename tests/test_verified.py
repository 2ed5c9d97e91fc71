"""Verified reconstruction: exploding inverses are detected and corrected."""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from chains import (
    NaNInverse,
    Scale,
    assert_healthy,
    assert_unstable,
    exploding_chain,
    gradient_sensitive_chain,
    healthy_chain,
    reconstruction_errors,
)
from reference import assert_rel_close, plain_chain, rel_error, scalar_loss
from torch import nn

import revgrad

TOL32 = revgrad.default_tol(torch.float32)


def _reference_grads(net: nn.Module, x: torch.Tensor):
    ref = copy.deepcopy(net)
    xr = x.clone().requires_grad_()
    scalar_loss(plain_chain(ref, xr)).backward()
    return xr.grad, [p.grad for p in ref.parameters()]


def _revgrad_grads(net: nn.Module, x: torch.Tensor, **options):
    model = revgrad.reversible(copy.deepcopy(net), **options)
    xx = x.clone().requires_grad_()
    scalar_loss(model(xx)).backward()
    return model, xx.grad, [p.grad for p in model.parameters()]


def _worst_param_error(actual, expected) -> float:
    return max(rel_error(a, e) for a, e in zip(actual, expected))


def _drifting_chain(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = list(healthy_chain(6, channels=4, affine_every=0))
    bad = Scale(4, inverse_error=0.01) if kind == "inverse-off-by-1%" else NaNInverse(4)
    return nn.Sequential(*blocks[:4], bad, *blocks[4:])


def _assert_drifting_premise(net: nn.Sequential, x: torch.Tensor, bad: int = 4) -> None:
    """Only block ``bad`` fails: its input is off by >= 100 tol even from its exact output, and the
    blocks above it, rebuilt from the top, stay within tol / 10 (those below it get exact inputs from
    the correction)."""
    tol = revgrad.default_tol(x.dtype)
    one_step = reconstruction_errors(net, x)[bad]
    assert one_step >= 100 * tol, f"premise: block {bad} is off by only {one_step:.3g} (tol {tol:.3g})"
    above = max(reconstruction_errors(net, x, anchors=None)[bad + 1 :], default=0.0)
    assert above <= tol / 10, f"premise: the blocks above {bad} are off by {above:.3g} (tol {tol:.3g})"


SCENARIOS = {
    "exploding-affine-12": lambda: exploding_chain(depth=12),
    "exploding-affine-16": lambda: exploding_chain(depth=16, bias=-15.0, seed=1),
    "inverse-off-by-1%": lambda: _drifting_chain("inverse-off-by-1%"),
    "inverse-yields-nan": lambda: _drifting_chain("inverse-yields-nan"),
}


@pytest.fixture(params=sorted(SCENARIOS), ids=sorted(SCENARIOS))
def broken(request):
    net = SCENARIOS[request.param]()
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 7)
    # Each test below means something only if checks fail: some input, even rebuilt from its exact
    # output, is off by >= 100x the float32 tolerance (exploding: ~1e-2, measured 1150x and 3250x).
    assert_unstable(net, x, TOL32)
    return request.param, net, x


def test_default_mode_corrects_broken_chain(broken):
    name, net, x = broken
    gx_ref, gp_ref = _reference_grads(net, x)
    model, gx, gp = _revgrad_grads(net, x)  # default check="correct"
    assert model.config.check == "correct"
    report = model.last_report
    assert report.corrected, f"{name}: nothing was corrected"
    assert_rel_close(gx, gx_ref, 1e-4, f"{name}: input grad")
    for i, (a, e) in enumerate(zip(gp, gp_ref)):
        assert_rel_close(a, e, 1e-4, f"{name}: param {i} grad")
    assert report.correction_evaluations > 0
    assert report.max_error > report.tol


def test_check_off_really_breaks(broken):
    """The scenarios are real: unchecked reversible backprop gets these gradients wrong."""
    name, net, x = broken
    gx_ref, gp_ref = _reference_grads(net, x)
    _, gx, gp = _revgrad_grads(net, x, check="off")
    worst = max(rel_error(gx, gx_ref), _worst_param_error(gp, gp_ref))
    assert not worst <= 1e-3, f"{name}: check='off' gradients were right (worst error {worst:.3g})"


def test_detect_raises(broken):
    _, net, x = broken
    model = revgrad.reversible(copy.deepcopy(net), check="detect")
    xx = x.clone().requires_grad_()
    with pytest.raises(revgrad.ReconstructionError) as info:
        scalar_loss(model(xx)).backward()
    err = info.value
    assert isinstance(err, RuntimeError)
    assert type(model[err.block]).__name__ in str(err) and f"block {err.block}" in str(err)
    assert not err.error <= err.tol


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_healthy_chains_raise_no_false_alarm(seed, dtype):
    net = healthy_chain(24, channels=6, seed=seed).to(dtype)
    torch.manual_seed(100 + seed)
    x = torch.randn(3, 6, 5, 5, dtype=dtype, requires_grad=True)
    tol = revgrad.default_tol(dtype)
    # Premise: forward stores no anchor above the chain's input by default, so every block is rebuilt
    # from the top and errors compound: over all 32 blocks to 1.6e-6 - 3.1e-6 in float32 (seeds 0-3;
    # within tol / 2, no check near failing), over the first 12 to ~4e-7, within tol / 10.
    assert_healthy(net, x, tol, margin=2, anchors=None)
    first = nn.Sequential(*copy.deepcopy(list(net)[:12]))
    assert_healthy(first, x, tol, anchors=None)
    model = revgrad.reversible(net)
    for _ in range(2):
        scalar_loss(model(x)).backward()
    report = model.last_report
    assert report.corrected == [] and report.correction_evaluations == 0
    measured = [e for i, e in enumerate(report.errors) if i not in report.anchors]
    assert not any(math.isnan(e) for e in measured)
    assert max(measured) < report.tol / 2, f"healthy errors {max(measured):.3g} not 2x below tol {report.tol:.3g}"
    # Without anchors (check="detect"): no false alarm either.
    detect = revgrad.reversible(first, check="detect")
    scalar_loss(detect(x)).backward()
    assert detect.last_report.corrected == [] and detect.last_report.max_error < detect.last_report.tol


def test_report_fields_and_nan_where_unmeasured():
    net = exploding_chain(depth=12)
    x = torch.randn(3, 4, 5, 7, requires_grad=True)
    assert_unstable(net, x, TOL32)  # premise: blocks are corrected, so the report says so
    model = revgrad.reversible(net, anchor_every=4)
    scalar_loss(model(x)).backward()
    rep = model.last_report
    assert len(rep.errors) == len(model) == 24
    assert rep.anchors == [0, 4, 8, 12, 16, 20]
    for i in rep.anchors:
        assert math.isnan(rep.errors[i])
    assert rep.max_error == max(e for e in rep.errors if not math.isnan(e))
    assert rep.evaluations >= len(model)
    assert "corrected" in str(rep)


def test_nan_reconstruction_reports_inf_error():
    net = _drifting_chain("inverse-yields-nan")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    model = revgrad.reversible(net)
    scalar_loss(model(x)).backward()
    rep = model.last_report
    assert 4 in rep.corrected and rep.errors[4] == math.inf
    assert torch.isfinite(x.grad).all()


def test_warn_switch_reports_each_correction_once(caplog, monkeypatch):
    """``warn=True``: a log record where logging is set up, else a RuntimeWarning; never both."""
    net = _drifting_chain("inverse-off-by-1%")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    quiet = revgrad.reversible(copy.deepcopy(net))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scalar_loss(quiet(x)).backward()  # off by default: no warning
    loud = revgrad.reversible(copy.deepcopy(net), warn=True)
    # Logging configured (pytest's capture handler sits on the root logger): one log record, no warning.
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="revgrad"):
        warnings.simplefilter("always")
        scalar_loss(loud(x)).backward()
    records = [r for r in caplog.records if "recomputed it from the anchor" in r.getMessage()]
    assert len(records) == len(loud.last_report.corrected) == 1
    assert "block 4 (Scale)" in records[0].getMessage()
    assert not [w for w in caught if "recomputed it from the anchor" in str(w.message)]
    # Logging not configured: one warning, no log record.
    logger = logging.getLogger("revgrad")
    monkeypatch.setattr(logger, "propagate", False)
    assert not logger.hasHandlers()
    caplog.clear()
    loud = revgrad.reversible(copy.deepcopy(net), warn=True)  # no adaptive anchor from the step above
    with pytest.warns(RuntimeWarning, match=r"block 4 \(Scale\)") as caught:
        scalar_loss(loud(x)).backward()
    assert len([w for w in caught if "recomputed it from the anchor" in str(w.message)]) == 1
    assert not [r for r in caplog.records if "recomputed" in r.getMessage()]


def test_explicit_tol_is_used():
    net = _drifting_chain("inverse-off-by-1%")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    model = revgrad.reversible(net, tol=0.5)  # a 1 % error passes a 50 % tolerance
    scalar_loss(model(x)).backward()
    assert model.last_report.corrected == [] and model.last_report.tol == 0.5


# -- adaptive anchors ------------------------------------------------------------------------------


def _step(model, x):
    scalar_loss(model(x)).backward()
    return model.last_report


def test_adaptive_anchor_kept_then_released():
    net = _drifting_chain("inverse-off-by-1%")
    bad = net[4]
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    _assert_drifting_premise(net, x)
    model = revgrad.reversible(net, anchor_every=100, release_after=3)  # only block 0 is a regular anchor
    first = _step(model, x)
    assert first.corrected == [4] and first.correction_evaluations == 4
    second = _step(model, x)
    assert 4 in second.anchors and second.corrected == [] and second.correction_evaluations == 0
    assert second.errors[4] > second.tol  # still measured against the stored input
    bad.inverse_error = 0.0  # the block heals: three clean steps release the anchor
    for _ in range(3):
        rep = _step(model, x)
        assert 4 in rep.anchors
    assert 4 not in _step(model, x).anchors


def test_adaptive_anchor_gradients_exact():
    net = _drifting_chain("inverse-off-by-1%")
    x = torch.randn(2, 4, 3, 3)
    _assert_drifting_premise(net, x)
    gx_ref, gp_ref = _reference_grads(net, x)
    model = revgrad.reversible(copy.deepcopy(net), anchor_every=100)
    for _ in range(3):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        scalar_loss(model(xx)).backward()
        assert_rel_close(xx.grad, gx_ref, 1e-5, "input grad")
        for a, e in zip(model.parameters(), gp_ref):
            assert_rel_close(a.grad, e, 1e-5, "param grad")


def test_adaptive_budget_limits_and_zero_disables():
    torch.manual_seed(0)
    blocks = [Scale(4, inverse_error=0.01) for _ in range(6)]
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    one = x[0:1].numel() * 2 * 4  # bytes of one block input (batch 2, float32)
    model = revgrad.reversible(copy.deepcopy(blocks), anchor_every=100, adaptive_budget=2 * one)
    # Each step promotes the topmost failing block; the budget stops promotion after two.
    reports = [_step(model, x) for _ in range(5)]
    assert [len(r.anchors) for r in reports] == [1, 2, 3, 3, 3]
    assert reports[-1].corrected and all(r.corrected for r in reports)
    off = revgrad.reversible(copy.deepcopy(blocks), anchor_every=100, adaptive_budget=0)
    _step(off, x)
    assert _step(off, x).anchors == [0]


@pytest.mark.parametrize("stored", [True, False], ids=["anchors-in-forward", "anchors-laid-lazily"])
def test_fused_blocks_differentiate_at_their_stored_input(monkeypatch, stored):
    """Additive couplings at anchors and in a corrected segment take the fused pass at the stored
    input (``exact=``); only the block without a fused path is recomputed generically. fp64 grads =
    plain autograd."""
    torch.manual_seed(0)
    # 9 blocks: anchors at 0, 3, 6 (stored in forward with anchor_every=3; by default only 0 is, and
    # the correction lays 3 and 6 as it recomputes from 0); block 8's inverse is off, so its input is
    # recomputed from the anchor at 6, which also stores block 7's exact input.
    net = nn.Sequential(*healthy_chain(8, channels=4, affine_every=0), Scale(4, inverse_error=0.01)).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    _assert_drifting_premise(net, x, bad=8)
    generic: list[int] = []
    original = revgrad.engine.backprop._Backward._recompute_vjp

    def spy(self, i, *args):
        generic.append(i)
        return original(self, i, *args)

    monkeypatch.setattr(revgrad.engine.backprop._Backward, "_recompute_vjp", spy)
    monkeypatch.setattr(revgrad.engine.backprop, "DEFER_CHECKS", "never")  # one pass: each recompute once
    gx_ref, gp_ref = _reference_grads(net, x)
    options = {"anchor_every": 3} if stored else {}
    model, gx, gp = _revgrad_grads(net, x, probe_every=0, **options)  # a probe recomputes blocks once more
    assert model.last_report.anchors == ([0, 3, 6] if stored else [0])
    assert model.last_report.corrected == [8]
    assert model.last_report.correction_evaluations == (2 if stored else 8)
    assert generic == [8], generic
    assert_rel_close(gx, gx_ref, 1e-10, "input grad")
    for i, (a, e) in enumerate(zip(gp, gp_ref)):
        assert_rel_close(a, e, 1e-10, f"param {i} grad")


# -- deferred checks: one host sync per backward ------------------------------------------------------


@pytest.fixture
def deferred(monkeypatch):
    """Checks deferred whatever the previous step did (REVGRAD_DEFER_CHECKS=always); counts the per-block reads
    (``_measure``)."""
    monkeypatch.setattr(revgrad.engine.backprop, "DEFER_CHECKS", "always")
    reads: list[int] = []
    original = revgrad.engine.backprop._Backward._measure

    def spy(self, err, i):
        reads.append(i)
        return original(self, err, i)

    monkeypatch.setattr(revgrad.engine.backprop._Backward, "_measure", spy)
    return reads


def test_deferred_checks_read_nothing_per_block_on_a_clean_chain(deferred):
    net = healthy_chain(9, channels=4, affine_every=3).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    assert_healthy(net, x, revgrad.default_tol(torch.float64), anchors="default")
    gx_ref, gp_ref = _reference_grads(net, x)
    model, gx, gp = _revgrad_grads(net, x, probe_every=0)  # a probed backward checks per block
    report = model.last_report
    assert report.deferred and not report.rerun and not report.corrected
    assert deferred == [], "a deferred pass read errors block by block"
    measured = [e for i, e in enumerate(report.errors) if i not in report.anchors]
    assert measured and all(0 <= e <= report.tol for e in measured)
    assert_rel_close(gx, gx_ref, 1e-10, "input grad")
    for i, (a, e) in enumerate(zip(gp, gp_ref)):
        assert_rel_close(a, e, 1e-10, f"param {i} grad")


def test_deferred_check_failure_reruns_with_corrections_then_checks_per_block(broken, deferred):
    name, net, x = broken
    gx_ref, gp_ref = _reference_grads(net, x)
    model = revgrad.reversible(copy.deepcopy(net), probe_every=0)  # a probed backward checks per block
    evaluations = []
    for step in range(2):
        xx = x.clone().requires_grad_()
        scalar_loss(model(xx)).backward()
        report = model.last_report
        assert_rel_close(xx.grad, gx_ref, 1e-4, f"{name}, step {step}: input grad")
        for i, (p, e) in enumerate(zip(model.parameters(), gp_ref)):
            assert_rel_close(p.grad, e * (step + 1), 1e-4, f"{name}, step {step}: param {i} grad")
        evaluations.append(report.evaluations)
        if step == 0:
            # The deferred pass failed, so the pass ran again, checking each block and correcting.
            assert report.deferred and report.rerun and report.corrected
            corrected = list(report.corrected)
            assert deferred, "the rerun did not check per block"
        else:
            # The step before failed a check: this one checks per block from the start (the
            # corrected blocks now hold adaptive anchors, used as exact).
            assert not report.deferred and not report.rerun
            assert set(corrected) <= set(report.anchors)
    assert evaluations[0] > evaluations[1], "the rerun's evaluations are not counted"


def test_probed_backward_checks_per_block_and_the_next_one_defers(deferred):
    net = healthy_chain(6, channels=4, affine_every=3).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    assert_healthy(net, x, revgrad.default_tol(torch.float64), anchors="default")
    model = revgrad.reversible(copy.deepcopy(net), probe_every=3)
    probed = []
    for _ in range(4):
        deferred.clear()
        scalar_loss(model(x.clone().requires_grad_())).backward()
        rep = model.last_report
        probed.append(rep.probed)
        assert rep.deferred == (not rep.probed) and (deferred == []) == rep.deferred
    assert probed == [True, False, False, True]


def test_deferred_detect_raises_for_the_block_nearest_the_output(monkeypatch):
    net = _drifting_chain("inverse-off-by-1%")
    x = torch.randn(3, 4, 5, 7)
    errors = {}
    for defer in ("never", "always"):
        monkeypatch.setattr(revgrad.engine.backprop, "DEFER_CHECKS", defer)
        model = revgrad.reversible(copy.deepcopy(net), check="detect")
        with pytest.raises(revgrad.ReconstructionError) as info:
            scalar_loss(model(x.clone().requires_grad_())).backward()
        errors[defer] = info.value
    assert errors["always"].block == errors["never"].block
    assert str(errors["always"]) == str(errors["never"])


class _NaNOnDemand(Scale):
    """A scale whose inverse writes one NaN while ``bad`` is set."""

    bad = False

    def inverse(self, y):
        x = super().inverse(y)
        if self.bad:
            x = x.clone()
            x.view(-1)[3] = math.nan
        return x


def test_deferred_pass_that_raises_below_a_failed_check_reruns(deferred):
    """A deferred pass goes on with a rebuilt input that failed its check; a block below may raise on
    it (here anomaly mode on the NaN's gradient). The failed check is the cause: the pass runs again
    per block and corrects, as the per-block checks would have from the start. A block's own error
    (every check passed) is raised as it is."""
    torch.manual_seed(0)
    blocks = list(healthy_chain(6, channels=4, affine_every=0))
    net = nn.Sequential(*blocks[:4], _NaNOnDemand(4), *blocks[4:]).double()
    x = torch.randn(3, 4, 5, 7, dtype=torch.float64)
    gx_ref, gp_ref = _reference_grads(net, x)
    model = revgrad.reversible(copy.deepcopy(net), probe_every=0)
    scalar_loss(model(x.clone().requires_grad_())).backward()  # clean: the next step defers
    model.zero_grad()
    model[4].bad = True
    xx = x.clone().requires_grad_()
    with torch.autograd.set_detect_anomaly(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode warns with the forward's traceback
        scalar_loss(model(xx)).backward()
    rep = model.last_report
    assert rep.deferred and rep.rerun and rep.corrected == [4], rep
    assert_rel_close(xx.grad, gx_ref, 1e-10, "input grad")
    for i, (p, e) in enumerate(zip(model.parameters(), gp_ref)):
        assert_rel_close(p.grad, e, 1e-10, f"param {i} grad")

    class Refuses(nn.Module):  # its own error, raised in backward's recompute of block 1
        def forward(self, x):
            if torch.is_grad_enabled():
                raise ValueError("refused by the block itself")
            return x, torch.zeros(x.shape[0], dtype=x.dtype)

        def inverse(self, y):
            return y

    model = revgrad.reversible(nn.Sequential(Scale(4), Refuses(), Scale(4)).double(), probe_every=0)
    with pytest.raises(ValueError, match="refused by the block itself"):
        scalar_loss(model(x.clone().requires_grad_())).backward()


def test_no_deferral_with_backward_hooks_inside_blocks(deferred):
    net = healthy_chain(4, channels=4, affine_every=0)
    model = revgrad.reversible(net, probe_every=0)  # a probed backward is never deferred anyway
    calls = []
    next(m for m in model.modules() if isinstance(m, nn.Conv2d)).register_full_backward_hook(
        lambda *args: calls.append(1)
    )
    scalar_loss(model(torch.randn(2, 4, 5, 6, requires_grad=True))).backward()
    assert not model.last_report.deferred
    assert len(calls) == 1


# -- gradient-aware checks: the VJP's sensitivity sets each activation's tolerance --------------------


def _sensitive_setup():
    net = gradient_sensitive_chain()
    torch.manual_seed(3)
    x = torch.randn(4, 4, 8, 8)
    tol = revgrad.default_tol(torch.float32)
    gx_ref, gp_ref = _reference_grads(net, x)
    ref = torch.cat([gx_ref.flatten(), *(g.flatten() for g in gp_ref)])
    return net, x, tol, ref


def _flat_grads(model, x):
    xx = x.clone().requires_grad_()
    scalar_loss(model(xx)).backward()
    return torch.cat([xx.grad.flatten(), *(p.grad.flatten() for p in model.parameters())])


def test_gradient_sensitive_activation_is_corrected_although_its_check_passes():
    """Every rebuilt activation is within tol / 5, yet unchecked reversible backprop's gradient is
    >= 1e-3 off: block 1's VJP is thousands of times as sensitive to its output as the output is
    off. The default engine measures that sensitivity and uses the exact activation."""
    net, x, tol, ref = _sensitive_setup()
    # Premises, with wide margins: the checks pass (errors as the engine sees them, anchor at 0 only) ...
    assert_healthy(net, x, tol, margin=5, anchors=10)
    # ... and the gradient of classic reversible backprop is far off.
    off = revgrad.reversible(copy.deepcopy(net), check="off")
    assert rel_error(_flat_grads(off, x), ref) >= 1e-3
    model = revgrad.reversible(copy.deepcopy(net), anchor_every=10)
    for step in range(4):  # the first backward probes; the next ones check against the tightened tol
        for p in model.parameters():
            p.grad = None
        err = rel_error(_flat_grads(model, x), ref)
        assert err <= 1e-5, f"step {step}: gradient off by {err:.3g}"
        rep = model.last_report
        assert rep.probed == (step == 0)
        assert max(e for e in rep.errors if e == e) <= tol, "the input checks alone would pass"
        if step == 0:
            assert rep.sensitivity[1] >= 100 and 2 in rep.corrected
        else:  # block 2's input now comes from its adaptive anchor
            assert 2 in rep.corrected + rep.from_adaptive or 2 in rep.anchors


def test_gradient_sensitive_activation_detected():
    net, x, _, _ = _sensitive_setup()
    model = revgrad.reversible(copy.deepcopy(net), check="detect", anchor_every=10)
    with pytest.raises(revgrad.ReconstructionError, match=r"block 2 \(Flip\).*VJP of block 1 \(AffineCoupling\)"):
        _flat_grads(model, x)


def _probe_schedule(values_per_probe, steps: int, every: int = 20, corrected_at=()) -> list[int]:
    """The passes a ``Sensitivity`` probes, the k-th probe measuring ``values_per_probe(k)``."""
    from revgrad.engine.sensitivity import Sensitivity

    sens, probes = Sensitivity(every), []
    for step in range(steps):
        probing = sens.probing()
        if probing:
            for j, s in values_per_probe(len(probes)).items():
                sens.observe(j, s)
            probes.append(step)
        sens.finish(probing, corrected=step in corrected_at)
    return probes


def test_probes_back_off_while_sensitivities_hold_still_and_return_when_they_grow():
    from revgrad.engine.sensitivity import BACKOFF, GROWTH

    assert (GROWTH, BACKOFF) == (2.0, 8)
    # Stable (within a factor 2, values at most BUDGET counting as BUDGET): twice as late each time,
    # up to 8 x every.
    steady = _probe_schedule(lambda k: {1: 1.5, 2: 0.1 if k % 2 else 1.9, 3: 300.0 * (1.9 if k % 2 else 1)}, 700)
    assert steady == [0, 20, 60, 140, 300, 460, 620]
    # A sensitivity more than doubling brings back every (20) from that probe on.
    jump = _probe_schedule(lambda k: {1: 1.5 if k < 4 else 40.0}, 400)
    assert jump == [0, 20, 60, 140, 300, 320, 360]
    # A block measured for the first time counts from BUDGET (1): stable at 1.5, not at 40.
    assert _probe_schedule(lambda k: {1: 1.5, **({2: 1.5} if k >= 3 else {})}, 400) == [0, 20, 60, 140, 300]
    new_block = _probe_schedule(lambda k: {1: 1.5, **({2: 40.0} if k >= 3 else {})}, 400)
    assert new_block == [0, 20, 60, 140, 160, 200, 280]
    # A pass that corrected a block: probe again after every.
    assert _probe_schedule(lambda k: {1: 1.5}, 200, corrected_at=(60,)) == [0, 20, 60, 80, 120]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_a_probe_moves_the_activation_by_eps_in_its_own_precision(dtype):
    """The probe's move is ``eps`` per sample, relative, also where eps is far below float32's rounding
    (a float64 chain's smallest move is 1e-11: rounded through float32 it moved by ~3e-8 and read
    sensitivities a thousand times too high)."""
    from revgrad.engine.sensitivity import perturbed

    h = (torch.randn(4, 3, 5, dtype=torch.float64) + 2.0).to(dtype)
    eps = 1e-11 if dtype == torch.float64 else 1e-5
    moved = perturbed(h, eps, step=3)
    assert moved.dtype == dtype
    rel = (moved - h).flatten(1).double().norm(dim=1) / h.flatten(1).double().norm(dim=1)
    assert torch.allclose(rel, torch.full_like(rel, eps), rtol=1e-3 if dtype == torch.float64 else 0.1), rel


def test_engine_probes_back_off_on_a_chain_whose_sensitivity_holds_still():
    """A chain of per-channel scales on a positive input with the loss ``sum(y) + sum(logdet)``: each
    VJP is linear in its activation and sums positive terms (no cancellation), so a move of ``eps``
    moves it by about ``eps / sqrt(n)``; every probe finds the chain stable and the probes come at
    0, k, 3k, 7k, 15k, 23k."""
    torch.manual_seed(0)
    model = revgrad.reversible(nn.Sequential(*[Scale(4) for _ in range(5)]).double(), probe_every=2)
    x = torch.rand(3, 4, 5, dtype=torch.float64) + 1.0
    probed, worst = [], 0.0
    for step in range(48):
        y, logdet = model(x.clone().requires_grad_())
        (y.sum() + logdet.sum()).backward()
        rep = model.last_report
        if rep.probed:
            probed.append(step)
            worst = max([worst, *[s for s in rep.sensitivity if not math.isnan(s)]])
    assert worst <= 0.5, f"premise: these VJPs' sensitivity is far below 1, measured {worst:.3g}"
    assert probed == [0, 2, 6, 14, 30, 46]


def test_checks_defer_on_cpu_by_default_and_match_plain_autograd(monkeypatch):
    """``auto`` defers on CPU too (one vectorised comparison at the end saves a comparison's per-op
    overhead per block): the first (probing) backward checks per block, a clean one after it settles
    all at once, reading nothing per block; a broken chain's failed deferred pass reruns, corrects and
    matches plain autograd, and the step after a correction checks per block."""
    monkeypatch.setattr(revgrad.engine.backprop, "DEFER_CHECKS", "auto")
    reads: list[int] = []
    original = revgrad.engine.backprop._Backward._measure
    monkeypatch.setattr(revgrad.engine.backprop._Backward, "_measure",
                        lambda self, err, i: reads.append(i) or original(self, err, i))
    net = healthy_chain(9, channels=4, affine_every=3).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    assert_healthy(net, x, revgrad.default_tol(torch.float64), anchors="default")
    gx_ref, gp_ref = _reference_grads(net, x)
    model = revgrad.reversible(copy.deepcopy(net))
    for step in range(3):
        reads.clear()
        xx = x.clone().requires_grad_()
        scalar_loss(model(xx)).backward()
        rep = model.last_report
        assert rep.deferred == (step > 0) and rep.probed == (step == 0) and not rep.rerun, (step, rep)
        assert (reads == []) == rep.deferred
        assert_rel_close(xx.grad, gx_ref, 1e-10, f"step {step}: input grad")
        for i, (p, e) in enumerate(zip(model.parameters(), gp_ref)):
            assert_rel_close(p.grad, e * (step + 1), 1e-10, f"step {step}: param {i} grad")

    broken = _drifting_chain("inverse-off-by-1%")
    xb = torch.randn(3, 4, 5, 7)
    gx_ref, gp_ref = _reference_grads(broken, xb)
    model = revgrad.reversible(copy.deepcopy(broken), probe_every=0)
    seen = []
    for step in range(3):
        xx = xb.clone().requires_grad_()
        scalar_loss(model(xx)).backward()
        rep = model.last_report
        seen.append((rep.deferred, rep.rerun, bool(rep.corrected)))
        assert_rel_close(xx.grad, gx_ref, 1e-4, f"broken, step {step}: input grad")
        for i, (p, e) in enumerate(zip(model.parameters(), gp_ref)):
            assert_rel_close(p.grad, e * (step + 1), 1e-4, f"broken, step {step}: param {i} grad")
    assert seen[0] == (True, True, True), seen  # deferred, failed, rerun per block with corrections
    assert not seen[1][0], seen  # after a correction: per block


# -- what is guaranteed: the float64 truth, not only plain float32 autograd -----------------------------


def _glow_steps(steps: int, channels: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    for _ in range(steps):
        net = nn.Sequential(
            nn.Conv2d(channels // 2, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, channels, 3, padding=1)
        )
        blocks += [revgrad.ActNorm(channels), revgrad.InvertibleConv1x1(channels), revgrad.AffineCoupling(net)]
    return nn.Sequential(*blocks)


DEEP_CHAINS = {  # name: (builder, channels, classic reversible backprop is far off)
    "exploding-affine-24": (lambda: exploding_chain(24, bias=-6.0), 4, True),
    "glow-steps-16": (lambda: _glow_steps(16), 8, False),
    "gradient-sensitive": (gradient_sensitive_chain, 4, True),
}


@pytest.mark.parametrize("name", list(DEEP_CHAINS))
def test_float32_gradient_is_as_close_to_the_float64_truth_as_plain_autograds(name):
    """In float32 the reference is not exact either: plain autograd's own gradient is some distance
    from the float64 truth. revgrad's promise, measured: its gradient is no farther from the truth
    than plain float32 autograd's (within a factor 1.5, plus float32 rounding), also where classic
    reversible backprop is far off."""
    build, channels, hard = DEEP_CHAINS[name]
    net = build()
    torch.manual_seed(1)
    x = torch.randn(4, channels, 8, 8)
    with torch.no_grad():
        plain_chain(net, x)  # ActNorm's data-dependent initialisation, in float32

    def grads(run, params, inp):
        xx = inp.clone().requires_grad_()
        scalar_loss(run(xx)).backward()
        return torch.cat([xx.grad.flatten(), *(p.grad.flatten() for p in params)]).double()

    net64 = copy.deepcopy(net).double()
    truth = grads(lambda h: plain_chain(net64, h), list(net64.parameters()), x.double())
    net32 = copy.deepcopy(net)
    plain = rel_error(grads(lambda h: plain_chain(net32, h), list(net32.parameters()), x), truth)
    if hard:
        off = revgrad.reversible(copy.deepcopy(net), check="off")
        off_error = rel_error(grads(off, list(off.parameters()), x), truth)
        # (~10x plain's error on every path measured, CPU and kernels: asserted with a 3x margin)
        assert not off_error <= 3 * plain + 1e-5, f"premise: unchecked backprop should be far off ({off_error:.3g})"
    model = revgrad.reversible(copy.deepcopy(net))
    error = rel_error(grads(model, list(model.parameters()), x), truth)
    assert error <= 1.5 * plain + 1e-7, f"{name}: {error:.3g} from the float64 truth, plain float32 {plain:.3g}"


def test_a_probe_on_overflowed_gradients_measures_nothing_and_probes_again():
    """An fp16 step whose gradients overflow (a GradScaler skips it) must not leave tolerance 0 behind:
    the next backward would correct every block (or, under "detect", raise)."""
    torch.manual_seed(0)
    net = healthy_chain(6, channels=4, affine_every=2).float()
    model = revgrad.reversible(copy.deepcopy(net), check="detect")
    x = torch.randn(3, 4, 5, 5)
    out = model(x.clone().requires_grad_())
    (scalar_loss(out) * float("inf")).backward()  # every incoming gradient is inf or NaN
    assert model.last_report.probed
    out = model(x.clone().requires_grad_())
    scalar_loss(out).backward()  # raised "tolerance 0" before
    report = model.last_report
    assert report.probed, "the step after a skipped probe must probe again"
    measured = [s for s in report.sensitivity if not math.isnan(s)]
    assert measured and all(math.isfinite(s) for s in measured)
    out = model(x.clone().requires_grad_())
    scalar_loss(out).backward()
    assert not model.last_report.probed and not model.last_report.corrected


# -- anchors laid lazily, and drift anchors ---------------------------------------------------------


def test_two_corrections_in_one_pass_recompute_from_the_anchor_the_first_laid():
    """Forward stores only the chain's input; the first correction recomputes from block 0 and lays
    the regular anchors on its way, so a second failure below recomputes from the nearest of them.
    fp64 gradients = plain autograd."""
    torch.manual_seed(0)
    # 12 blocks (regular anchors every ceil(sqrt(12)) = 4): wrong inverses at 10 and 6.
    blocks = list(healthy_chain(10, channels=4, affine_every=0))
    blocks.insert(6, Scale(4, inverse_error=0.01))
    blocks.insert(10, Scale(4, inverse_error=0.01))
    net = nn.Sequential(*blocks).double()
    assert len(net) == 12
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    # Premise: both wrong inverses are seen even from their exact outputs.
    errors, tol = reconstruction_errors(net, x), revgrad.default_tol(torch.float64)
    assert errors[6] >= 100 * tol and errors[10] >= 100 * tol
    gx_ref, gp_ref = _reference_grads(net, x)
    model, gx, gp = _revgrad_grads(net, x, probe_every=0)
    report = model.last_report
    assert report.anchors == [0] and report.corrected == [10, 6]
    # 10 blocks from block 0 (laying anchors at 4 and 8), then 2 from the anchor at 4.
    assert report.correction_evaluations == 10 + 2
    assert_rel_close(gx, gx_ref, 1e-10, "input grad")
    for i, (a, e) in enumerate(zip(gp, gp_ref)):
        assert_rel_close(a, e, 1e-10, f"param {i} grad")


def _deep_drifting():
    """A healthy float32 chain of 53 blocks whose rebuilt inputs, rebuilt from the top, drift to the
    tolerance (1e-5) near block 17: float32 rounding compounding, no wrong inverse."""
    net = healthy_chain(40, channels=6)
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 5)
    return net, x


def test_drift_anchors_stop_rebuilt_errors_compounding():
    """A rebuilt input that passes its check with more than DRIFT of its tolerance is stored from the
    next step on and used as exact (one per pass), so the rebuild restarts there; float32 gradients
    end as close to the float64 truth as plain autograd's plus the tolerance, and closer than with no
    drift anchors."""
    net, x = _deep_drifting()
    tol = revgrad.default_tol(torch.float32)
    # Premise: rebuilt from the top, the drift passes 3 x DRIFT of the tolerance (measured: 1e-5).
    drift = max(reconstruction_errors(net, x, anchors=None))
    assert drift >= 0.5 * tol, f"premise: drift {drift:.3g} should pass tol / 2 here"
    gx, gp = _reference_grads(net.double(), x.double())
    truth = [gx, *gp]
    net.float()
    gx, gp = _reference_grads(net, x)
    plain = [gx, *gp]
    model = revgrad.reversible(copy.deepcopy(net))
    drifted = []
    for _ in range(10):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        scalar_loss(model(xx)).backward()
        report = model.last_report
        assert len(report.drifted) <= 1 and not (set(report.drifted) & set(report.anchors))
        drifted += report.drifted
    got = [xx.grad, *(p.grad for p in model.parameters())]
    assert len(drifted) >= 2 and set(drifted) <= set(report.anchors), (drifted, report.anchors)
    worst = max(rel_error(a, e) for a, e in zip(got, truth))
    worst_plain = max(rel_error(a, e) for a, e in zip(plain, truth))
    assert worst <= worst_plain + tol, f"revgrad {worst:.3g} vs plain {worst_plain:.3g} from the float64 truth"

    # Without drift anchors the same chain ends farther from the truth (what they are for).
    saved = revgrad.engine.backprop.DRIFT
    revgrad.engine.backprop.DRIFT = math.inf
    try:
        undrifted = revgrad.reversible(copy.deepcopy(net))
        for _ in range(10):
            undrifted.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            scalar_loss(undrifted(xx)).backward()
        assert undrifted.last_report.drifted == []
        got = [xx.grad, *(p.grad for p in undrifted.parameters())]
    finally:
        revgrad.engine.backprop.DRIFT = saved
    assert max(rel_error(a, e) for a, e in zip(got, truth)) > worst


def test_drift_anchors_are_released_and_measured_again():
    """``release_after`` steps after it was laid a drift anchor is released: that step rebuilds the
    input again and measures it (laying it again if it still drifts: the drift anchors laid since
    above it may have taken its place)."""
    net, x = _deep_drifting()
    model = revgrad.reversible(copy.deepcopy(net), release_after=2)
    reports = []
    for _ in range(8):
        scalar_loss(model(x.clone().requires_grad_())).backward()
        reports.append(model.last_report)
    first = next(k for k, r in enumerate(reports) if r.drifted)
    i = reports[first].drifted[0]
    assert i in reports[first + 1].anchors and i in reports[first + 2].anchors
    assert i not in reports[first + 3].anchors and not math.isnan(reports[first + 3].errors[i])
    assert reports[first + 3].errors[i] <= reports[first + 3].tol



def test_drift_anchors_give_way_to_failures_and_to_the_budget():
    """The byte budget is shared: a failing block's anchor evicts drift anchors (the newest first);
    when held anchors grow (a larger batch) drift anchors go first; one due drift anchor is released
    per step; an index already held is not laid again."""
    from revgrad.engine.anchors import AdaptiveAnchors

    state = AdaptiveAnchors(budget_bytes=300, release_after=2)
    assert state.drifted(5, 100, 0) and state.drifted(9, 100, 0) and state.drifted(12, 100, 0)
    assert not state.drifted(9, 100, 0)  # already held
    assert not state.drifted(14, 100, 0)  # over the budget
    state.tick(frozenset({5, 9, 12}))
    state.tick(frozenset({9, 12}))  # 9 and 12 have 2 uses now, 5 has 1
    assert state.drift_indices == {5, 12}  # one released per step: of those due, the first laid
    assert state.promote(3, 150, 0)  # a failure: drift anchors make room, the newest (least used) first
    assert state.indices == {3} and state.drift_indices == {12}
    state.refresh({3: 300, 12: 200}, 0)  # the batch doubled: over the budget, drift anchors go first
    assert state.drift_indices == frozenset() and state.indices == {3}
    state.refresh({3: 400}, 0)  # larger than the budget itself: released
    assert state.indices == frozenset()
    # The default budget (the regular anchors' bytes) always lets one anchor fit, as promote does.
    default = AdaptiveAnchors()
    assert default.promote(1, 100, 0)
    default.refresh({1: 400}, 0)
    assert default.indices == {1}


def test_adaptive_anchor_rebuild_is_measured_every_tenth_use_and_released_after_release_after():
    from revgrad.engine.anchors import AdaptiveAnchors

    state = AdaptiveAnchors(release_after=100)
    assert state.promote(4, 100, 100) and state.measure_every == 10
    measured = []
    for step in range(1, 101):
        if state.measuring(4):
            measured.append(step)
            state.observe(4, True)
        state.tick(frozenset(), frozenset(state.indices))
    assert measured == list(range(10, 101, 10)) and 4 not in state.indices  # 10 clean measurements
    # A failed measurement restarts the count; a new promotion restarts the uses.
    state = AdaptiveAnchors(release_after=100)
    state.promote(4, 100, 100)
    for step in range(1, 31):
        if state.measuring(4):
            state.observe(4, step != 20)
        state.tick(frozenset(), frozenset(state.indices))
    assert state.clean_runs[4] == 10 and state.uses[4] == 30
    state.promote(4, 100, 100)
    assert state.uses[4] == 0 and state.clean_runs[4] == 0 and AdaptiveAnchors(release_after=7).measure_every == 1

    # In the engine: the held anchor's rebuild is measured on its 10th use, not before.
    net = _drifting_chain("inverse-off-by-1%").double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _assert_drifting_premise(net, x)
    model = revgrad.reversible(copy.deepcopy(net), probe_every=0)
    assert _step(model, x.clone().requires_grad_()).corrected == [4]
    seen = [_step(model, x.clone().requires_grad_()) for _ in range(10)]
    assert all(4 in r.anchors and not r.corrected for r in seen)
    assert [not math.isnan(r.errors[4]) for r in seen] == [False] * 9 + [True]
    assert seen[-1].from_adaptive == [4] and seen[-1].errors[4] > seen[-1].tol  # measured: still off


def test_an_adaptive_anchor_is_used_even_when_its_rebuild_passes():
    """Once a block holds an adaptive anchor, backward differentiates at the stored input, also in
    steps where the rebuild is within tolerance (it is only measured, to release the anchor): float64
    gradients equal plain autograd's to rounding, not to the rebuild's error (0.5 tol).
    (``release_after=9``: the rebuild is measured every step, ``release_after // 10`` rounded up to 1.)"""
    net = _drifting_chain("inverse-off-by-1%").double()
    bad = net[4]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _assert_drifting_premise(net, x)
    model = revgrad.reversible(copy.deepcopy(net), probe_every=0, release_after=9)
    first = _step(model, x.clone().requires_grad_())
    assert first.corrected == [4]
    tol = revgrad.default_tol(torch.float64)
    model[4].inverse_error = bad.inverse_error = 0.5 * tol  # now its rebuild passes, off by half the tolerance
    assert tol / 10 <= reconstruction_errors(net, x)[4] <= tol  # premise
    gx_ref, gp_ref = _reference_grads(net, x)
    model.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    second = _step(model, xx)
    assert 4 in second.anchors and second.corrected == [] and second.from_adaptive == []
    assert tol / 10 <= second.errors[4] <= tol  # measured, passed, not used
    assert_rel_close(xx.grad, gx_ref, 1e-13, "input grad")
    for i, (p, e) in enumerate(zip(model.parameters(), gp_ref)):
        assert_rel_close(p.grad, e, 1e-13, f"param {i} grad")
