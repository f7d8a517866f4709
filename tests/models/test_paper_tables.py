"""CBAM Tables 4 and 5: every printed parameter count and GFLOPs is reproduced by counting the built model.

Parameters are compared at the printed 0.01M, GFLOPs (multiply-accumulates of conv and linear layers, 224 x
224, batch 1) at the printed 0.001G. ResNet-50/101 and ResNeXt rows are counted with the stride on the first
1x1 conv, the paper's convention (see cbam.models.paper); MobileNet's placement and MLP rounding are the ones
the counts imply (see cbam.models.mobilenet).
"""

from __future__ import annotations

import pytest

from cbam.models import profile_model
from cbam.models.paper import PAPER_ROWS, TABLE4, TABLE5, find_row


def test_tables_are_complete():
    assert len(TABLE4) == 24 and len(TABLE5) == 6
    assert len({r.label for r in PAPER_ROWS}) == len(PAPER_ROWS)
    assert find_row("resnet50 + cbam").top1_err == 22.66


@pytest.mark.parametrize("row", PAPER_ROWS, ids=[r.label for r in PAPER_ROWS])
def test_params_and_gflops_match_the_paper(row):
    measured = row.profile()
    assert round(measured["params"] / 1e6, 2) == pytest.approx(row.params_m, abs=1e-9), measured
    assert round(measured["macs"] / 1e9, 3) == pytest.approx(row.gflops, abs=1e-9), measured


def test_v1_convention_is_needed():
    """Counted with torchvision's stride placement (v1.5) the bottleneck baselines do not match."""
    assert round(profile_model("resnet101")["macs"] / 1e9, 3) == 7.801
    assert round(profile_model("resnext50_32x4d")["macs"] / 1e9, 3) == 4.230
