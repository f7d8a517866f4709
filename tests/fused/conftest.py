"""Fixtures shared by the fused-path tests."""

from __future__ import annotations

import pytest
import torch

from cbam.fused import native as native_kernels


@pytest.fixture
def native():
    """The hand-written CPU kernels, built (the first time on this machine) and loaded; without them (no C++ compiler,
    no ninja, ``CBAM_NATIVE=0``) the test is skipped with the reason, since CBAM then computes the reference path. A
    test asks for them as an argument, a module with ``pytestmark = pytest.mark.usefixtures("native")``."""
    reason = native_kernels.load()
    if reason is not None:
        pytest.skip(f"the CPU kernels are not available here: {reason}")


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    """One intra-op thread, as for the model tests: on the test machine's 2 shared cores, the kernels' and PyTorch's
    thread pools spin for cores other processes hold (float64 gradchecks took 15 s instead of 0.5 s). The tests of
    thread-count independence set their own counts."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
