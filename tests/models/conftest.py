"""Shared settings for the model tests: one intra-op thread.

The test machine has 2 shared cores; with the default thread pool, tiny convolutions spend most of their time
spinning for cores another process holds (a 64-model forward sweep took 137 s instead of 21 s).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
