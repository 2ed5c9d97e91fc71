import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


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
