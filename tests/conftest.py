"""Markers shared by the whole suite.

``@pytest.mark.compiler``: the test needs a working C++ compiler (torch.compile's Inductor generates C++ on the CPU).
On a machine without one the test is skipped with that reason, so the default suite passes there; here, where gcc
exists, it runs. (Tests of the fused kernels skip the same way through the ``native`` fixture of tests/fused.)
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import settings


@functools.cache
def cxx_missing() -> str | None:
    """None if the C++ compiler torch would use answers ``--version``, else why not."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return f"no C++ compiler ({cxx} not found)"
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the C++ compiler {cxx} does not work ({type(exc).__name__})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = cxx_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a C++ compiler for torch.compile: {reason}")
    for item in items:
        if item.get_closest_marker("compiler") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("single_thread")``): the test
    machine's two cores are shared, and small convolutions only spin on more (see tests/fused/conftest.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Under CI the fuzz tests draw the same examples every run (a fresh draw is for developers' runs), so that CI's verdict
# on a revision does not depend on the luck of the draw.
if os.environ.get("CI"):
    settings.register_profile("ci", derandomize=True)
    settings.load_profile("ci")
