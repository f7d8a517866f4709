"""The block's last BatchNorm folded into the fused CPU kernels: ``cbam_fused(m, y, residual, norm=bn)`` computes
``relu(m(bn(y)) + residual)`` without writing ``bn(y)``; every gradient, running statistic and option of
nn.BatchNorm2d must come out as if the BatchNorm had run on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from fused_helpers import saved_bytes
from torch import nn

from cbam import CBAM, create_model, fuse
from cbam.fused import blocks
from cbam.fused.function import cbam_fused, norm_folds
from cbam.layers import reference_only

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("native")


def _pair(channels: int, dtype=torch.float32, seed: int = 0, cbam_kwargs=None, **bn_kwargs):
    torch.manual_seed(seed)
    m = CBAM(channels, reduction=4, **(cbam_kwargs or {})).to(dtype)
    bn = nn.BatchNorm2d(channels, **bn_kwargs).to(dtype)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        if m.spatial is not None and m.spatial.norm is not None:
            m.spatial.norm.weight.uniform_(0.5, 1.5)
    return m, bn


def _run(m, bn, y, residual, dout, folded: bool):
    """Output, gradients (input, residual, every parameter) and buffers after one forward and backward."""
    y = y.detach().clone().requires_grad_()
    r = None if residual is None else residual.detach().clone().requires_grad_()
    if folded:
        out = cbam_fused(m, y, r, norm=bn)
    else:
        out = m.forward_reference(bn(y))
        out = out if r is None else torch.relu(out + r)
    out.backward(dout)
    grads = [y.grad] + ([] if r is None else [r.grad])
    grads += [p.grad for p in (*m.parameters(), *bn.parameters())]
    return [out, *grads, *(b.clone() for b in (*m.buffers(), *bn.buffers()))]


def _assert_close(got, expected, rel):
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        scale = float(e.detach().abs().max()) if e.is_floating_point() else 0.0
        torch.testing.assert_close(g, e, rtol=rel, atol=rel * scale + 1e-12, msg=f"result {i}")


CONFIGS = {
    "paper": {},
    "channel-only": {"spatial": False},
    "avg-only": {"pool_types": ("avg",)},
    "max-only-no-spatial-norm": {"pool_types": ("max",), "spatial_norm": False},
}


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "alone"])
def test_matches_batchnorm_then_reference(fmt, training, config, residual):
    m, bn = _pair(24, cbam_kwargs=CONFIGS[config])
    m.train(training), bn.train(training)
    shape = (5, 24, 7, 9)
    y = (torch.randn(shape) * 2 + 0.7).contiguous(memory_format=fmt)  # mean and scale far from 0 and 1
    r = torch.randn(shape).contiguous(memory_format=fmt) if residual else None
    dout = torch.randn(shape)
    expected = _run(copy.deepcopy(m), copy.deepcopy(bn), y, r, dout, folded=False)
    got = _run(copy.deepcopy(m), copy.deepcopy(bn), y, r, dout, folded=True)
    _assert_close(got, expected, 1e-5)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_split_and_bunch_boundary_in_float64(fmt, training):
    """Tiny tuning values force every block split and partial-sum combination; float64 leaves only rounding."""
    m, bn = _pair(20, torch.float64)
    m.train(training), bn.train(training)
    shape = (6, 20, 5, 7)
    y = (torch.randn(shape, dtype=torch.float64) + 0.5).contiguous(memory_format=fmt)
    r = torch.randn(shape, dtype=torch.float64)
    dout = torch.randn(shape, dtype=torch.float64)
    expected = _run(copy.deepcopy(m), copy.deepcopy(bn), y, r, dout, folded=False)
    previous = torch.ops.cbam_cpu.configure(16, 16, 1, 1)
    try:
        got = _run(copy.deepcopy(m), copy.deepcopy(bn), y, r, dout, folded=True)
    finally:
        torch.ops.cbam_cpu.configure(*previous)
    _assert_close(got, expected, 1e-10)


class _Tail(nn.Module):
    def __init__(self, m: CBAM, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.m, self.bn = m, bn

    def forward(self, y, r):
        return cbam_fused(self.m, y, r, norm=self.bn)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training):
    """The analytic backward (BatchNorm's included) against finite differences, for the input, the residual and every
    parameter of both modules."""
    m, bn = _pair(6, torch.float64)
    tail = _Tail(m, bn).train(training)
    names = [k for k, _ in tail.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in tail.parameters()]
    y = torch.randn(3, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 6, 4, 5, dtype=torch.float64, requires_grad=True)

    def fn(y, r, *ps):
        return torch.func.functional_call(tail, dict(zip(names, ps, strict=True)), (y, r))

    assert torch.autograd.gradcheck(fn, (y, r, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision_against_float64(dtype, fmt, training):
    """Half maps and parameters, folded, against float64 BatchNorm + reference on the same values (each plane holds
    distinct values exact in half precision, so no max ties)."""
    m, bn = _pair(16)
    m.train(training), bn.train(training)
    torch.manual_seed(3)
    n, c, h, w = 3, 16, 6, 6
    planes = torch.stack([torch.randperm(h * w) for _ in range(n * c)]).float() / 16 - 1
    y = planes.view(n, c, h, w).contiguous(memory_format=fmt)
    r, dout = torch.randn(y.shape), torch.randn(y.shape)
    m_half, bn_half = copy.deepcopy(m).to(dtype), copy.deepcopy(bn).to(dtype)
    exact = _run(
        copy.deepcopy(m_half).double(),
        copy.deepcopy(bn_half).double(),
        y.double(),
        r.to(dtype).double(),
        dout.to(dtype).double(),
        folded=False,
    )
    got = _run(m_half, bn_half, y.to(dtype), r.to(dtype), dout.to(dtype), folded=True)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)
    got = [g.double() if g.is_floating_point() else g for g in got]
    _assert_close(got, exact, 3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_running_statistics_like_batchnorm():
    """Momentum, cumulative averages (momentum=None), the batch counter, and statistics that are not tracked."""
    y = torch.randn(4, 8, 5, 5) * 3 + 1
    for kwargs in ({}, {"momentum": None}, {"momentum": 0.5}, {"track_running_stats": False}, {"affine": False}):
        m, bn = _pair(8, **kwargs)
        m_ref, bn_ref = copy.deepcopy(m), copy.deepcopy(bn)
        for _ in range(3):
            with torch.no_grad():
                got = cbam_fused(m, y, norm=bn)
                expected = m_ref.forward_reference(bn_ref(y))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for (k, a), b in zip(bn.state_dict().items(), bn_ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{kwargs} {k}")


def test_zero_weight_routes_ties_as_the_unfolded_fused_path():
    """A zero-initialised BatchNorm weight makes every channel of bn(y) constant: all its elements tie in the channel
    max pool. The folded kernels pick the first element, as the fused path does on bn(y) itself."""
    m, bn = _pair(8)
    with torch.no_grad():
        bn.weight.zero_()
    y, r, dout = torch.randn(3, 8, 6, 6), torch.randn(3, 8, 6, 6), torch.randn(3, 8, 6, 6)

    def run(folded):
        mm, bb = copy.deepcopy(m), copy.deepcopy(bn)
        yy = y.clone().requires_grad_()
        out = cbam_fused(mm, yy, r, norm=bb) if folded else cbam_fused(mm, bb(yy), r)
        out.backward(dout)
        return [out, yy.grad, bb.weight.grad, bb.bias.grad, *(p.grad for p in mm.parameters())]

    _assert_close(run(True), run(False), 1e-5)


def test_when_the_batchnorm_is_not_folded():
    y = torch.randn(2, 8, 4, 4)
    bn = nn.BatchNorm2d(8)
    assert norm_folds(bn, y)
    assert norm_folds(bn.eval(), torch.randn(1, 8, 1, 1))  # running statistics: any size
    assert not norm_folds(bn.train(), torch.randn(1, 8, 1, 1))  # BatchNorm itself refuses one value per channel
    assert norm_folds(bn, y.bfloat16()) and norm_folds(bn, y.half())
    assert not norm_folds(nn.SyncBatchNorm(8), y)
    assert not norm_folds(nn.BatchNorm2d(4), y)
    seen = []
    handle = bn.register_forward_hook(lambda mod, args, out: seen.append(out))
    assert not norm_folds(bn, y)
    m = CBAM(8, reduction=4)
    out = cbam_fused(m, y, norm=bn)  # the BatchNorm runs on its own, so its hook sees its output
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == y.shape
    torch.testing.assert_close(out, m.forward_reference(seen[0]))


def test_a_block_keeps_what_the_plain_block_keeps_plus_small_tensors():
    """ResNet-50 bottleneck after fuse(): the normalised map is never kept (the BatchNorm's input, which the plain
    block keeps too, is); what CBAM adds for backward are its MLP weights and N x C and N x H x W tensors. Unfused,
    the block keeps the BatchNorm's output for CBAM and the sum for the ReLU as well."""
    torch.manual_seed(0)
    x = torch.randn(2, 256, 16, 16, requires_grad=True)
    sizes = {}
    for label, kwargs in {"plain": {}, "cbam": {"attention": "cbam"}, "fused": {"attention": "cbam"}}.items():
        block = create_model("resnet50", num_classes=10, **kwargs).layer1[1]
        if label == "fused":
            assert fuse(block) == [""]
        sizes[label] = saved_bytes(lambda b=block: b(x).sum().backward())
    assert sizes["plain"] < sizes["fused"] <= 1.03 * sizes["plain"] < sizes["cbam"]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_torch_compile_fullgraph(fmt):
    """Traced without graph breaks; the same numbers and running statistics as the BatchNorm and reference path."""
    m, bn = _pair(16)
    shape = (3, 16, 6, 5)
    y = (torch.randn(shape) + 0.5).contiguous(memory_format=fmt)
    r, dout = torch.randn(shape), torch.randn(shape)
    expected = _run(copy.deepcopy(m), copy.deepcopy(bn), y, r, dout, folded=False)
    tail = _Tail(copy.deepcopy(m), copy.deepcopy(bn))
    compiled = torch.compile(tail, fullgraph=True)
    yc, rc = y.clone().requires_grad_(), r.clone().requires_grad_()
    out = compiled(yc, rc)
    out.backward(dout)
    got = [out, yc.grad, rc.grad, *(p.grad for p in tail.parameters()), *(b.clone() for b in tail.buffers())]
    _assert_close(got, expected, 1e-5)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_results_do_not_depend_on_the_thread_count(fmt):
    m, bn = _pair(48)
    shape = (9, 48, 12, 10)
    y = torch.randn(shape).contiguous(memory_format=fmt)
    r, dout = torch.randn(shape), torch.randn(shape)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            runs.append(_run(copy.deepcopy(m), copy.deepcopy(bn), y, r, dout, folded=True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mobilenet_v1", "cifar_resnet20"])
def test_networks_give_the_same_numbers_folded_or_not(monkeypatch, name):
    """MobileNet (CBAM after a BatchNorm, no residual) and CIFAR ResNets: float64 outputs, gradients and running
    statistics of the fused network (BatchNorms folded) against the unfused one on the reference path."""
    torch.manual_seed(0)
    separate = create_model(name, attention="cbam", num_classes=10).double()
    folded = copy.deepcopy(separate)
    assert fuse(folded)
    calls = []  # the fused blocks hand each CBAM and the BatchNorm in front of it to the kernels
    original = blocks.cbam_fused
    monkeypatch.setattr(blocks, "cbam_fused", lambda *a, **k: calls.append(k["norm"]) or original(*a, **k))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out_a = folded(x)
    assert len(calls) == sum(isinstance(m, CBAM) for m in folded.modules())
    assert all(isinstance(norm, nn.BatchNorm2d) for norm in calls)
    with reference_only():
        out_b = separate(x)
    torch.testing.assert_close(out_a, out_b)
    out_a.square().sum().backward()
    with reference_only():
        out_b.square().sum().backward()
    # (late MobileNet layers are 1 x 1 maps: BatchNorm over two values amplifies float64 rounding to about 1e-10)
    _assert_close([p.grad for p in folded.parameters()], [q.grad for q in separate.parameters()], 1e-8)
    _assert_close(list(folded.state_dict().values()), list(separate.state_dict().values()), 1e-10)
    with torch.no_grad():
        out_a = folded.eval()(x)
        with reference_only():
            torch.testing.assert_close(out_a, separate.eval()(x))
