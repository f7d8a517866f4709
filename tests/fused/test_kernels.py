"""The hand-written CPU kernels (``cbam.fused.kernels`` over ``torch.ops.cbam_cpu``): every split of the work,
thread counts, bunching, a model moved to channels-last, the operators' argument checks; and the reference path
where the kernels are turned off."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from cbam import CBAM
from cbam.fused.function import cbam_fused

CL = torch.channels_last


def _module(channels: int, seed: int = 0, **kwargs) -> CBAM:
    torch.manual_seed(seed)
    m = CBAM(channels, reduction=4, **kwargs)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.uniform_(-0.5, 0.5)
        if m.spatial is not None and m.spatial.norm is not None:
            m.spatial.norm.running_mean.uniform_(-0.2, 0.2)
            m.spatial.norm.running_var.uniform_(0.5, 2.0)
    return m


def _outputs(m: CBAM, x: torch.Tensor, fused: bool, grad: bool):
    x = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = cbam_fused(m, x) if fused else m.forward_reference(x)
    if not grad:
        return [out]
    torch.manual_seed(5)
    out.backward(torch.randn(out.shape))
    return [out, x.grad, *(p.grad for p in m.parameters())]


def _assert_close(got, expected, rel=1e-5):
    for g, e in zip(got, expected, strict=True):
        scale = float(e.detach().abs().max())
        torch.testing.assert_close(g, e, rtol=rel, atol=rel * scale + 1e-12)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("shape", [(5, 24, 7, 9), (1, 40, 17, 3), (6, 4, 2, 2)])
def test_every_split_and_bunch_boundary(native, fmt, training, grad, shape):
    """Tiny blocks: columns split into 16-wide blocks, rows into many blocks (partial results combined), one sample
    per bunch (the channel gate of each sample computed on its own), every float32 output written with streaming
    stores (rows of any alignment)."""
    m = _module(shape[1]).train(training)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    expected = _outputs(copy.deepcopy(m), x, fused=False, grad=grad)
    previous = torch.ops.cbam_cpu.configure(16, 16, 1, 1)
    try:
        got = _outputs(copy.deepcopy(m), x, fused=True, grad=grad)
    finally:
        torch.ops.cbam_cpu.configure(*previous)
    _assert_close(got, expected)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [9, 1])
def test_results_do_not_depend_on_the_thread_count(native, fmt, batch):
    """Nine samples: threads take whole samples. One sample: its passes, and its MLP's rows (small tasks forced),
    are split across the threads."""
    m = _module(48)
    x = torch.randn(batch, 48, 12, 10).contiguous(memory_format=fmt)
    threads = torch.get_num_threads()
    previous = torch.ops.cbam_cpu.configure(0, 16 if batch == 1 else 0, 0, 0)
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            runs.append(_outputs(copy.deepcopy(m), x, fused=True, grad=True))
            with torch.no_grad():
                runs[-1].append(cbam_fused(copy.deepcopy(m).eval(), x))
    finally:
        torch.set_num_threads(threads)
        torch.ops.cbam_cpu.configure(*previous)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_model_moved_to_channels_last(native):
    """``model.to(memory_format=channels_last)`` makes the 4-D convolution weight channels-last too."""
    m = _module(16)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    expected = _outputs(copy.deepcopy(m), x, fused=False, grad=True)
    moved = copy.deepcopy(m).to(memory_format=CL)
    assert not moved.spatial.conv.weight.is_contiguous()
    _assert_close(_outputs(moved, x, fused=True, grad=True), expected)
    with torch.no_grad():
        moved = copy.deepcopy(m).to(memory_format=CL).eval()
        _assert_close([cbam_fused(moved, x)], [copy.deepcopy(m).eval().forward_reference(x)])


def test_input_grad_rejects_an_out_of_range_arg_max(native):
    n, c, h, w = 2, 8, 3, 3
    d = torch.randn(n, c, h, w)
    pos, chan = torch.rand(n, h * w), torch.rand(n, c)
    bad = torch.full((n, h * w), c, dtype=torch.int32)  # channel index c does not exist
    with pytest.raises(RuntimeError, match="arg-max index is out of range"):
        torch.ops.cbam_cpu.input_grad(d, pos, pos, bad, pos, chan, chan, None, None)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("pool_types", [("avg", "max"), ("avg",), ("max",)])
@pytest.mark.parametrize("mode", ["eval", "train-grad"])
def test_results_do_not_depend_on_how_samples_are_bunched(native, fmt, pool_types, mode):
    """Each sample's channel gate is dot products in a fixed order, whether one sample or a few share a read of the
    MLP's weights: one sample per bunch and the whole batch in one give the same bits (outputs and gradients)."""
    m = _module(40, pool_types=pool_types).train(mode != "eval")
    x = torch.randn(7, 40, 9, 11).contiguous(memory_format=fmt)
    runs = []
    for bunch_bytes in (1, 1 << 40):
        previous = torch.ops.cbam_cpu.configure(0, 0, bunch_bytes, 0)
        try:
            runs.append(_outputs(copy.deepcopy(m), x, fused=True, grad=mode != "eval"))
        finally:
            torch.ops.cbam_cpu.configure(*previous)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    _assert_close(runs[0], _outputs(copy.deepcopy(m), x, fused=False, grad=mode != "eval"))


def test_disabled_by_environment_falls_back_to_the_reference():
    """CBAM_NATIVE=0 in a fresh process: nothing is built; modules and fused networks train on the reference path
    (needs no compiler)."""
    code = (
        "import torch; from cbam import CBAM, create_model, fuse; from cbam.fused import native_status;"
        "print(native_status().split(' (')[0]); m = CBAM(16); x = torch.randn(2, 16, 5, 5, requires_grad=True);"
        "out = m(x); print(native_status()); print(torch.equal(out, m.forward_reference(x)));"
        "out.sum().backward(); print(bool(torch.isfinite(x.grad).all()));"
        "net = create_model('cifar_resnet20', attention='cbam', num_classes=10); print(len(fuse(net)));"
        "net(torch.randn(2, 3, 32, 32)).sum().backward(); print(net.layer1[0].bn2.num_batches_tracked.item())"
    )
    env = {**os.environ, "CBAM_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    # (9 blocks fused; each block's last BatchNorm ran on its own, once)
    assert out.split("\n")[:6] == ["not built yet", "disabled by CBAM_NATIVE=0", "True", "True", "9", "1"]
