"""FlopCounterMode sees the true cost of a CBAM network wherever it runs, not only on the meta device.

``cbam profile`` counts on the meta device, where every CBAM module computes its reference path. On the CPU a
default-built network runs the hand-written kernels (custom operators) instead; they register FLOP formulas, so
``torch.utils.flop_counter.FlopCounterMode`` over the network counts all 60 cells of the paper's Tables 4-5 the same
way, in training mode (the training operators) and, fused, in inference (the single inference operator).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cbam
from cbam.fused import native
from cbam.models import count_params, create_model
from cbam.models.paper import PAPER_ROWS, find_row


@pytest.fixture(scope="module")
def kernels():
    reason = native.load()
    if reason is not None:
        pytest.skip(f"the CPU kernels are not available here: {reason}")


def _build(row) -> torch.nn.Module:
    """The row's network in the paper's counting convention (``profile_kwargs``: the v1 stride placement)."""
    return create_model(row.model, attention=row.attention, **row.kwargs, **row.profile_kwargs)


def _gmacs(model: torch.nn.Module) -> float:
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    return round(counter.get_total_flops() / 2 / 1e9, 3)


@pytest.mark.parametrize("row", PAPER_ROWS, ids=[r.label for r in PAPER_ROWS])
def test_default_network_on_the_cpu_counts_the_paper(row, kernels):
    torch.manual_seed(0)
    model = _build(row)
    assert round(count_params(model) / 1e6, 2) == pytest.approx(row.params_m, abs=1e-9)
    assert _gmacs(model) == pytest.approx(row.gflops, abs=1e-9)  # training mode, gradients on: training operators


@pytest.mark.parametrize("label", ["ResNet50 + CBAM", "ResNeXt50 (32x4d) + CBAM", "MobileNet alpha=1.0 + CBAM"])
def test_fused_network_at_inference_counts_the_paper(label, kernels):
    row = find_row(label)
    model = _build(row).eval()
    assert cbam.fuse(model)
    with torch.no_grad():
        assert _gmacs(model) == pytest.approx(row.gflops, abs=1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_kernels_ran(kernels, training):
    """The counts above went through the custom operators (they would pass vacuously on the reference path)."""
    model = create_model("resnet18", attention="cbam").train(training)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
        model(torch.randn(2, 3, 64, 64))
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    expected = (
        {"cbam_cpu.pools_and_channel_gate", "cbam_cpu.spatial_conv"} if training else {"cbam_cpu.forward_inference"}
    )
    assert expected <= ops, ops
