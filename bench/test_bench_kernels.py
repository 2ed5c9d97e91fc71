"""Fused coupling ops per provider: ``triton`` kernels, ``eager`` PyTorch twins, ``compile``.

    pytest bench/test_bench_kernels.py --benchmark-disable   # smoke: each case once + agreement
    pytest bench/test_bench_kernels.py --benchmark-only      # timings; GB/s in extra_info

On CPU only ``eager`` is timed: Triton runs there through its interpreter, which is for correctness
(``tests/test_kernels.py``), and ``compile`` of these ops is measured on the GPU only (``bench/gpu_suite.sh``
runs ``bench/kernel_bandwidth.py``, which also measures the device's copy bandwidth). A provider whose
outputs disagree with eager's is not benchmarked.
"""

from __future__ import annotations

import kernel_ops
import pytest
import torch
from kernel_ops import OPS, PROVIDERS, case, compiled_graphs, make_inputs, outputs_agree

CUDA = torch.cuda.is_available()
SHAPE = (16, 32, 64, 64) if CUDA else (4, 6, 16, 16)
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]


@pytest.fixture(scope="module", params=DTYPES)
def inputs(request):
    return make_inputs(SHAPE, request.param, "cuda" if CUDA else "cpu")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_kernel_op(benchmark, op, provider, inputs):
    if provider != "eager" and not CUDA:
        pytest.skip(f"{provider} is timed on a GPU only (CPU: the interpreter checks correctness)")
    tol = 1e-5 if inputs.x.dtype == torch.float32 else 2e-2
    err = outputs_agree(op, inputs, provider)
    assert err <= tol, f"{provider} {op}: outputs differ from eager by {err:.3g}"
    run = case(op, provider, inputs)
    benchmark.group = f"kernel-{op}-{inputs.x.dtype}".replace("torch.", "")
    benchmark.extra_info["bytes"] = run.nbytes
    if CUDA:
        run.run()
        torch.cuda.synchronize()
        benchmark(lambda: (run.run(), torch.cuda.synchronize()))
    else:
        benchmark(run.run)
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["GB/s"] = run.nbytes / benchmark.stats.stats.median / 1e9


def test_compile_provider_compiles_every_variant(monkeypatch):
    """Each of the 10 op x dtype variants gets its own compiled function: none runs eager for lack of
    room in dynamo's cache (its recompile limit is 8 per code object). Dynamo's "eager" backend keeps
    this cheap on CPU; tracing, caching and the limit are the same as with inductor."""
    monkeypatch.setattr(kernel_ops, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()  # recompile counts are per process: start from none, whatever ran before
    for dtype in (torch.float32, torch.bfloat16):
        t = make_inputs((2, 6, 4, 4), dtype, "cpu")
        for op in OPS:
            run = case(op, "compile", t)
            run.run()
            graphs = compiled_graphs(op, t)
            assert graphs >= 1, f"{op} {dtype}: no graph compiled"
            run.run()
            assert compiled_graphs(op, t) == graphs, f"{op} {dtype}: recompiled on the same inputs"
            assert outputs_agree(op, t, "compile") <= (1e-6 if dtype == torch.float32 else 1e-2)
