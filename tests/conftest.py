import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def float32_precision(new: tuple | None = None) -> tuple:
    """The float32 precision of cuDNN convolutions and of CUDA matmuls; sets ``new`` when given.

    cuDNN convolutions default to TF32 on Ampere and newer GPUs (10-bit mantissa, ~1e-3 relative),
    which no float32 tolerance of these tests allows for; matmuls default to IEEE unless changed.
    torch >= 2.9 spells it ``fp32_precision`` ("ieee"), older torch ``allow_tf32`` (False).
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    modern = hasattr(getattr(cudnn, "conv", None), "fp32_precision")
    owners, attr = ((cudnn.conv, matmul), "fp32_precision") if modern else ((cudnn, matmul), "allow_tf32")
    old = tuple(getattr(o, attr) for o in owners)
    for owner, value in zip(owners, new or ()):
        setattr(owner, attr, value)
    return old


IEEE_FLOAT32 = ("ieee", "ieee") if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision") \
    else (False, False)


@pytest.fixture(autouse=True, scope="session")
def _ieee_float32():
    """Every test computes float32 convolutions and matmuls in IEEE float32, also on a GPU."""
    old = float32_precision(IEEE_FLOAT32)
    yield
    float32_precision(old)


@pytest.fixture(autouse=True)
def _cuda_code_path_on_cpu(request, monkeypatch):
    """In the CPU dry run of the CUDA tests (``REVGRAD_TEST_DEVICE=cpu``, no GPU), take the path CUDA
    takes: the Triton kernels through the interpreter (one tensor per block, fingerprints inside the
    kernels; CPU tensors would otherwise take the PyTorch twins and the two-part path) and deferred
    checks (one settle per backward). Needs ``TRITON_INTERPRET=1``."""
    if "cuda" not in request.keywords or torch.cuda.is_available():
        yield
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("the CPU dry run of the CUDA tests needs TRITON_INTERPRET=1 (kernels through the interpreter)")
    import revgrad.engine.backprop

    monkeypatch.setenv("REVGRAD_KERNELS", "triton")
    monkeypatch.setattr(revgrad.engine.backprop, "DEFER_CHECKS", "always")
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test tensors are tiny: one intra-op thread is faster, and far steadier on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("REVGRAD_TEST_DEVICE"):
        return  # REVGRAD_TEST_DEVICE=cpu: a dry run of the CUDA tests on the CPU (tests/test_cuda.py)
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
