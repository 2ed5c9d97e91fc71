"""The kernels compile for CUDA ahead of time, without a GPU: ``bench/kernel_aot.py`` under test.

Every ``@triton.jit`` kernel of ``kernels/``, in each specialization its launcher makes over the
script's case matrix (storage dtypes incl. autocast's float32 input with a bf16 conditioner output,
scale kinds, fingerprint on/off, add/subtract, two geometries), compiles for sm_80 and sm_90 with
the installed Triton, and the wheel's ``ptxas -v`` reports no spills; every grid stays within
CUDA's limits, also for a batch above 65535. The script runs once per module in a subprocess
without ``TRITON_INTERPRET`` (the kernels must be real JIT functions); CI runs this file with
Triton 3.9 and 3.6. 82 specializations, 164 compilations: 45-50 s on 2 cores shared with other work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from revgrad.ops import dispatch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "kernel_aot.py"


def _unavailable() -> str | None:
    if dispatch.triton_error() is not None:
        return f"revgrad.kernels does not import: {dispatch.triton_error()}"
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        return "this Triton wheel has no bundled ptxas"
    return None


if os.environ.get("REVGRAD_REQUIRE_KERNELS") == "1" and _unavailable():
    raise RuntimeError(f"REVGRAD_REQUIRE_KERNELS=1: {_unavailable()}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]


@pytest.fixture(scope="module")
def aot(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"bench/kernel_aot.py wrote nothing (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    result["returncode"] = proc.returncode
    return result


def test_every_specialization_compiles_for_sm80_and_sm90_without_spills(aot):
    import triton

    assert aot["triton"] == triton.__version__, "the subprocess saw another Triton"
    assert aot["problems"] == [], "\n".join(aot["problems"])
    assert aot["returncode"] == 0
    assert aot["archs"] == ["sm_80", "sm_90"]
    assert aot["compiles"] == 2 * aot["specializations"] == len(aot["rows"])
    targets = {(row["arch"], row["ptx_target"]) for row in aot["rows"]}
    assert targets == {("sm_80", "sm_80"), ("sm_90", "sm_90a")}, targets
    # 64-72 with the fingerprint folded in; the [chunks, 128, M] product at once took up to 168 and spilled.
    worst = max(aot["rows"], key=lambda row: row["registers"])
    assert worst["registers"] <= 80, f"register pressure crept back: {worst['label']} on {worst['arch']}: {worst}"


def test_every_kernel_is_launched_by_a_case(aot):
    kernels = {name.rsplit(".", 1)[1]: info for name, info in aot["kernels"].items() if info["launched"]}
    assert set(kernels) >= {"_fingerprint_kernel", "_affine_fwd_kernel", "_affine_inv_kernel",
                            "_affine_bwd_kernel", "_residual_kernel"}
    assert all(info["specializations"] > 0 for info in kernels.values()), kernels


def _variants(aot, kernel: str, *fields: str) -> set[tuple]:
    rows = [r for r in aot["rows"] if r["kernel"] == kernel and r["arch"] == "sm_90"]
    names = {f: i for i, f in enumerate(rows[0]["signature"])}
    out = set()
    for r in rows:
        consts = {int(k.strip("(,)")): v for k, v in r["constexprs"].items()}
        out.add(tuple(consts.get(names[f], r["signature"][f]) for f in fields))
    return out


def test_the_matrix_reaches_every_mode(aot):
    """The cases cover what the launchers can be asked for: storage dtypes (autocast's mixed ones
    included), scale kinds, fingerprint on/off, add/subtract and each fingerprint source."""
    fwd = _variants(aot, "_affine_fwd_kernel", "x_ptr", "h_ptr", "KIND", "WANT_FP")
    assert {(x, h) for x, h, _, _ in fwd} == {("*fp32", "*fp32"), ("*bf16", "*bf16"), ("*fp16", "*fp16"),
                                              ("*fp32", "*bf16")}
    assert {(k, fp) for x, h, k, fp in fwd if (x, h) == ("*fp32", "*bf16")} == {
        (k, fp) for k in ("0", "1", "2") for fp in ("True", "False")}
    bwd = _variants(aot, "_affine_bwd_kernel", "y_ptr", "h_ptr", "KIND", "HAS_GLD")
    assert {(k, g) for _, _, k, g in bwd} == {(k, g) for k in ("0", "1", "2") for g in ("True", "False")}
    res = _variants(aot, "_residual_kernel", "a_ptr", "r_ptr", "SUBTRACT", "FP")
    assert {(s, f) for _, _, s, f in res} == {("False", "0"), ("False", "1"), ("True", "0"), ("True", "2")}
    assert ("*fp32", "*bf16", "True", "2") in res
    fps = _variants(aot, "_fingerprint_kernel", "x_ptr")
    assert fps == {("*fp32",), ("*bf16",), ("*fp16",)}
    # The tall geometry (batch 70000) was launched and compiled: its grids passed the limit check.
    assert any(" tall " in r["label"] for r in aot["rows"])


def test_launch_grid_keeps_the_batch_off_the_limited_axes():
    """CUDA allows 65535 programs on grid axes y and z: the batch is folded into axis x."""
    from revgrad.kernels.fingerprint import GRID_X_MAX, launch_grid

    for batch in (1, 3, 65535, 65536, 70_000, 1_000_000):
        for programs in (1, 2, 8, 2048):
            grid = launch_grid(batch, programs)
            assert grid == (batch * programs,) and grid[0] <= GRID_X_MAX
    assert launch_grid(0, 4) == (0,)  # an empty batch launches nothing
    with pytest.raises(ValueError, match="programs"):
        launch_grid(2**21, 2**10)
