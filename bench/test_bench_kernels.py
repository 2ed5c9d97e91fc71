"""Fused coupling ops per provider (issue #4): ``triton`` kernels, ``eager`` PyTorch twins, ``compile``.

    pytest bench/test_bench_kernels.py --benchmark-disable   # smoke: each case once + agreement
    pytest bench/test_bench_kernels.py --benchmark-only      # timings; GB/s in extra_info

On CPU only ``eager`` is timed: Triton runs there through its interpreter, which is for correctness
(``tests/test_kernels.py``), and ``compile`` of these ops is measured on the GPU only (``bench/gpu_suite.sh``
runs ``bench/kernel_bandwidth.py``, which also measures the device's copy bandwidth). A provider whose
outputs disagree with eager's is not benchmarked.
"""

from __future__ import annotations

import pytest
import torch
from kernel_ops import OPS, PROVIDERS, case, make_inputs, outputs_agree

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
