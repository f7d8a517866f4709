"""Fixtures shared by the layer tests."""

from __future__ import annotations

import pytest

from cbam.layers import cbam_fused as fused_module
from cbam.layers import fused_cpu


@pytest.fixture
def native(monkeypatch):
    """The fused path pinned to the hand-written CPU kernels, which must have loaded (a test module asks for it with
    ``pytestmark = pytest.mark.usefixtures("native")``)."""
    assert fused_cpu.native_available(), fused_cpu.native_status()
    monkeypatch.setattr(fused_module, "_PATH_OVERRIDE", "native")
