"""Benchmark suites: sizes (tiny by default, real with ``REVGRAD_BENCH_FULL=1``) and torch threads.

    python -m pytest bench --benchmark-disable -q                   # CI: every step once, tiny sizes
    REVGRAD_BENCH_FULL=1 python -m pytest bench --benchmark-only    # the real sizes, timed
    REVGRAD_BENCH_THREADS=2 ...                                     # torch CPU threads (default 1)

One torch thread by default: on a machine shared with other work an OpenMP step waits for every
descheduled thread, and tiny steps run faster on one thread anyway. The objects alive at the start
are frozen out of the garbage collector's sight: every memory measurement collects garbage first,
which takes ~0.2 s with all of torch's modules in sight.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _bench_session():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("REVGRAD_BENCH_THREADS", "1")))
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(before)
