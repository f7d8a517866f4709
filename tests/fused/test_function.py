"""The fused CBAM computation (``cbam.fused.function``) against the reference path: values, gradients, BatchNorm
state, formats, dtypes, ties, saved tensors, torch.compile, the residual tail; and how ``CBAM.forward`` dispatches to
it on the CPU. Tests that take the ``native`` fixture need the hand-written kernels (skipped where they cannot be
built); the reference path is ``CBAM.forward_reference``."""

from __future__ import annotations

import copy

import pytest
import torch
from fused_helpers import randomise_all
from torch import nn

from cbam import CBAM, create_model, fuse
from cbam.fused import FusedBlock, blocks, function
from cbam.fused.function import cbam_fused, cpu_kernel, supported
from cbam.layers import reference_only
from cbam.layers.dispatch import registered_kernels

CL = torch.channels_last


# ---------------------------------------------------------------- helpers
def _make(channels: int = 16, seed: int = 0, **kwargs) -> CBAM:
    """A CBAM with every bias and BN affine parameter random (the presets start many at 0)."""
    torch.manual_seed(seed)
    kwargs.setdefault("reduction", 4)
    m = CBAM(channels, **kwargs)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.uniform_(-0.5, 0.5)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _run(m: CBAM, x: torch.Tensor, dout: torch.Tensor | None, fused: bool):
    """Output, input gradient, parameter gradients and buffers after one forward (+ backward if dout is given)."""
    x = x.detach().clone().requires_grad_(dout is not None)
    out = cbam_fused(m, x) if fused else m.forward_reference(x)
    if dout is not None:
        out.backward(dout)
    grads = {k: p.grad for k, p in m.named_parameters()}
    buffers = {k: b.clone() for k, b in m.named_buffers()}
    return out, x.grad, grads, buffers


def _close(actual, expected, rel: float, floor: float = 0.0) -> None:
    """Within rel of the expected tensor's scale: elementwise rtol plus an atol of rel * max(max|expected|, floor).

    floor covers gradients that are zero up to rounding (the conv bias before a training-mode BatchNorm)."""
    assert actual is not None and expected is not None
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, floor) + 1e-12)


def _compare(m: CBAM, x: torch.Tensor, rel: float = 1e-5, backward: bool = True) -> torch.Tensor:
    """Fused (on a deep copy) against reference: output, every gradient, every buffer; returns the fused output."""
    fused_m = copy.deepcopy(m)
    torch.manual_seed(123)
    dout = torch.randn(x.shape).to(x.dtype) if backward else None
    ref = _run(m, x, dout, fused=False)
    got = _run(fused_m, x, dout, fused=True)
    _close(got[0], ref[0], rel)
    assert got[0].is_contiguous() == ref[0].is_contiguous()
    assert got[0].is_contiguous(memory_format=CL) == ref[0].is_contiguous(memory_format=CL)
    if backward:
        _close(got[1], ref[1], rel)
        largest = max(float(g.abs().max()) for g in ref[2].values() if g is not None)
        # a conv bias followed by a training-mode BatchNorm has a zero gradient: both paths give rounding noise
        bias_is_zero = m.training and m.spatial is not None and m.spatial.norm is not None and x.numel() > x.shape[1]
        for k, g in ref[2].items():
            assert (got[2][k] is None) == (g is None), k
            if g is None:
                continue
            if k == "spatial.conv.bias" and bias_is_zero:
                assert float(got[2][k].abs().max()) <= 10 * rel * largest
            else:
                _close(got[2][k], g, rel, 0.01 * largest)
    for k, b in ref[3].items():
        if b.is_floating_point():
            _close(got[3][k], b, rel)
        else:
            assert torch.equal(got[3][k], b), k
    return got[0]


def _x(shape, seed: int = 1, fmt=torch.contiguous_format, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)


# ---------------------------------------------------------------- float32 against the reference
@pytest.mark.parametrize("preset", ["paper", "seed", "timm"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_presets_formats_modes(native, preset, fmt, training):
    m = _make(32, preset=preset, reduction=None).train(training)
    assert supported(m) is None
    _compare(m, _x((3, 32, 6, 5), fmt=fmt))


@pytest.mark.parametrize("pool_types", [("avg",), ("max",), ("avg", "max"), ("max", "avg")])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_pool_subsets_and_kernels(native, pool_types, kernel_size):
    _compare(_make(pool_types=pool_types, kernel_size=kernel_size), _x((2, 16, 7, 6)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_norm": False},
        {"spatial_norm": False, "spatial_bias": True},
        {"mlp_bias": False},
        {"mlp_bias": False, "spatial_bias": True, "spatial_norm": True},
        {"kernel_size": 1},
        {"hidden": 1},
        {"spatial": False},
        {"spatial": False, "pool_types": ("max",)},
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_options(native, kwargs, training):
    m = _make(**kwargs).train(training)
    assert supported(m) is None
    _compare(m, _x((2, 16, 5, 4), fmt=CL if training else torch.contiguous_format))


@pytest.mark.parametrize("shape", [(1, 16, 1, 1), (3, 16, 1, 1), (1, 16, 1, 5), (1, 16, 13, 2), (2, 16, 3, 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tiny_and_degenerate_shapes(native, shape, training):
    # batch 1 at 1 x 1 in training: the reference normalises with the running statistics and keeps them
    _compare(_make().train(training), _x(shape))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_odd_shapes(native, fmt):
    m = _make(5, hidden=3)
    _compare(m, _x((3, 5, 5, 7), fmt=fmt))
    _compare(_make(7, hidden=2, kernel_size=3), _x((1, 7, 9, 3), fmt=fmt))


def test_strided_input_and_dout(native):
    m = _make()
    base = _x((2, 16, 6, 10))
    x = base[:, :, :, ::2]  # neither NCHW- nor channels-last-contiguous
    _compare(m, x)
    # an expanded gradient (what .sum().backward() passes)
    fused_m = copy.deepcopy(m)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    m.forward_reference(xr).sum().backward()
    cbam_fused(fused_m, xf).sum().backward()
    _close(xf.grad, xr.grad, 1e-5)


def test_running_stats_over_several_steps_and_cumulative_momentum(native):
    m = _make(preset="timm", reduction=None)
    m.spatial.norm.momentum = None  # cumulative moving average: factor 1 / num_batches_tracked
    fused_m = copy.deepcopy(m)
    for step in range(3):
        x = _x((2, 16, 5, 5), seed=10 + step)
        _close(cbam_fused(fused_m, x), m.forward_reference(x), 1e-5)
    for name, buf in m.named_buffers():
        got = dict(fused_m.named_buffers())[name]
        if buf.is_floating_point():
            _close(got, buf, 1e-5)
        else:
            assert torch.equal(got, buf)
    assert int(fused_m.spatial.norm.num_batches_tracked) == 3


def test_no_grad_and_frozen_parameters(native):
    m = _make()
    x = _x((2, 16, 5, 6))
    with torch.no_grad():
        _close(cbam_fused(copy.deepcopy(m), x), m.forward_reference(x), 1e-5)
        # eval mode: nothing to keep and no batch statistics (the kernels run the module as one operator)
        for kwargs in ({}, {"spatial": False}, {"spatial_norm": False, "spatial_bias": True}, {"pool_types": ("max",)}):
            me = _make(**kwargs).eval()
            for fmt in (torch.contiguous_format, CL):
                xe = x.contiguous(memory_format=fmt)
                out = cbam_fused(copy.deepcopy(me), xe)
                _close(out, me.forward_reference(xe), 1e-5)
                assert out.is_contiguous(memory_format=fmt)
    # x without grad, parameters with grad
    fm = copy.deepcopy(m)
    m.forward_reference(x).square().sum().backward()
    cbam_fused(fm, x).square().sum().backward()
    for p, q in zip(m.parameters(), fm.parameters(), strict=True):
        _close(q.grad, p.grad, 1e-5)
    # x with grad, parameters frozen
    fm = copy.deepcopy(m).requires_grad_(False)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    copy.deepcopy(m).requires_grad_(False).forward_reference(xr).square().sum().backward()
    cbam_fused(fm, xf).square().sum().backward()
    _close(xf.grad, xr.grad, 1e-5)
    assert all(p.grad is None for p in fm.parameters())


# ---------------------------------------------------------------- float64 gradcheck
class _Fused(nn.Module):
    def __init__(self, m: CBAM) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cbam_fused(self.m, x)


@pytest.mark.parametrize(
    "kwargs, training, fmt",
    [
        ({}, True, torch.contiguous_format),
        ({}, False, CL),
        ({"preset": "seed", "reduction": None}, True, CL),
        ({"preset": "timm", "reduction": None, "kernel_size": 3}, True, torch.contiguous_format),
        ({"pool_types": ("max",), "spatial_bias": True}, True, torch.contiguous_format),
        ({"spatial": False}, True, CL),
    ],
)
def test_gradcheck_float64_input_and_all_parameters(native, kwargs, training, fmt):
    m = _make(8, **{"reduction": 2, **kwargs}).double().train(training)
    wrapper = _Fused(m)
    names = [k for k, _ in wrapper.named_parameters()]
    x = _x((2, 8, 3, 4), dtype=torch.double, fmt=fmt).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- reduced precision and autocast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision(native, dtype, fmt, training):
    """Half inputs and parameters against a float64 reference on the same values (few distinct values in bf16 make
    exact ties likely, and the reference splits their gradient: each plane holds distinct values here)."""
    m = _make(32).train(training)
    torch.manual_seed(2)
    n, c, h, w = 2, 32, 6, 6
    planes = torch.stack([torch.randperm(h * w) for _ in range(n * c)]).float() / 16 - 1  # exact in bf16
    x = planes.view(n, c, h, w).contiguous(memory_format=fmt)
    dout = torch.randn(x.shape)
    m_half = copy.deepcopy(m).to(dtype)
    exact = _run(copy.deepcopy(m_half).double(), x.double(), dout.double(), fused=False)
    ref_half = _run(copy.deepcopy(m_half), x.to(dtype), dout.to(dtype), fused=False)
    got = _run(m_half, x.to(dtype), dout.to(dtype), fused=True)
    rel = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)
    _close(got[0], ref_half[0], rel)
    _close(got[0].double(), exact[0], rel)
    _close(got[1].double(), exact[1], rel)
    for k, g in exact[2].items():
        assert got[2][k].dtype == dtype
        if k != "spatial.conv.bias":
            _close(got[2][k].double(), g, rel)
    for k, b in exact[3].items():
        _close(got[3][k].double(), b.double(), rel)


def test_under_cpu_autocast(native):
    m = _make(32)
    x = _x((2, 32, 6, 6))
    fm = copy.deepcopy(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m.forward_reference(x.clone().requires_grad_())
        xf = x.clone().requires_grad_()
        out = cbam_fused(fm, xf)
    assert out.dtype == ref.dtype == torch.float32
    exact = copy.deepcopy(m).forward_reference(x)  # float32 without autocast: the kernels compute in float32 inside
    _close(out, exact, 1e-5)
    _close(out, ref, 3e-2)
    out.sum().backward()
    assert torch.isfinite(xf.grad).all() and all(torch.isfinite(p.grad).all() for p in fm.parameters())


# ---------------------------------------------------------------- max ties: the first maximum takes the gradient
def _tied_module() -> CBAM:
    return _make(6, hidden=3, kernel_size=3).double()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_ties_in_the_channel_max_go_to_the_first_position(native, fmt):
    m = _tied_module()
    x = _x((2, 6, 4, 5), dtype=torch.double)
    top = x.amax(dim=(2, 3), keepdim=True) + 1.0
    x[:, :, 2, 1], x[:, :, 0, 3] = top[:, :, 0, 0], top[:, :, 0, 0]  # two exact maxima per plane: flat 3 and 11
    x = x.contiguous(memory_format=fmt)
    broken = x.clone()
    broken[:, :, 0, 3] += 1e-9  # makes the first of them the unique maximum
    fused_grads = _run(copy.deepcopy(m), x, torch.ones_like(x), fused=True)
    expected = _run(copy.deepcopy(m), broken, torch.ones_like(x), fused=False)
    _close(fused_grads[1], expected[1], 1e-6)
    for k, g in expected[2].items():
        _close(fused_grads[2][k], g, 1e-6)
    # the reference splits the gradient between the two maxima instead
    split = _run(copy.deepcopy(m), x, torch.ones_like(x), fused=False)
    assert not torch.allclose(split[1], fused_grads[1], atol=1e-6)
    _close(split[1].sum(dim=(2, 3)), fused_grads[1].sum(dim=(2, 3)), 1e-9)  # same total per plane


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("tied", [(0, 1), (5, 10)])  # 5 = 0 * 8 + 5, 10 = 1 * 8 + 2
def test_ties_in_the_spatial_max_go_to_the_first_channel(native, fmt, tied):
    m = _make(16, hidden=3, kernel_size=3).double()  # 16 channels: two levels (2 x 8) in channels-last
    with torch.no_grad():
        m.channel.fc2.bias.fill_(100.0)  # channel gate exactly 1.0 for every channel
    x = _x((2, 16, 4, 5), dtype=torch.double)
    first, second = tied
    x[:, second] = x[:, first] = x.amax(dim=1) + 1.0  # two channels tie for the maximum at every position
    x = x.contiguous(memory_format=fmt)
    broken = x.clone()
    broken[:, first] += 1e-9
    fused_grads = _run(copy.deepcopy(m), x, torch.ones_like(x), fused=True)
    expected = _run(copy.deepcopy(m), broken, torch.ones_like(x), fused=False)
    _close(fused_grads[1], expected[1], 1e-6)
    split = _run(copy.deepcopy(m), x, torch.ones_like(x), fused=False)
    assert not torch.allclose(split[1], fused_grads[1], atol=1e-6)


# ---------------------------------------------------------------- memory: only x and small tensors are saved
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_saves_only_the_input_and_small_tensors(native, fmt):
    m = _make(64, spatial_bias=True)
    x = _x((4, 64, 12, 12), fmt=fmt).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = cbam_fused(m, x)
    big = [t for t in saved if t.numel() * 2 > x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    small = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr())
    assert small < 0.2 * x.numel() * x.element_size()
    out.sum().backward()


# ---------------------------------------------------------------- configurations served and refused
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"pool_types": ("avg", "lp")}, "lp"),
        ({"pool_types": ("lse",)}, "lse"),
        ({"arrangement": "spatial_first"}, "spatial_first"),
        ({"arrangement": "parallel"}, "parallel"),
        ({"spatial_compress": "conv"}, "conv"),
        ({"gate": "hard_sigmoid"}, "Hardsigmoid"),
        ({"act_layer": "gelu"}, "GELU"),
        ({"act_layer": "silu"}, "SiLU"),
    ],
)
def test_unsupported_configurations_give_a_reason_and_run_the_reference(kwargs, words):
    m = CBAM(16, 4, **kwargs)
    reason = supported(m)
    assert isinstance(reason, str) and words in reason
    with pytest.raises(ValueError, match="the fused CPU kernels do not compute"):
        cbam_fused(m, torch.randn(1, 16, 4, 4))
    x = torch.randn(2, 16, 4, 4)
    assert cpu_kernel(m, x) is None  # the dispatch table's kernel declines: CBAM.forward computes the reference
    torch.testing.assert_close(m(x), m.forward_reference(x), rtol=0, atol=0)


def test_supported_configurations():
    for preset in ("paper", "seed", "timm"):
        assert supported(CBAM(32, preset=preset)) is None
    assert supported(CBAM(32, spatial=False)) is None
    m = CBAM(32)
    m.spatial.conv.dilation = (2, 2)
    assert "convolution" in supported(m)


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.randn(16, 4, 4), ValueError, "4-D"),
        (torch.randn(2, 8, 4, 4), ValueError, "expected 16 channels, got 8"),
        (torch.ones(2, 16, 4, 4, dtype=torch.int64), TypeError, "floating-point"),
    ],
)
def test_bad_inputs(native, x, error, words):
    with pytest.raises(error, match=words) as info:
        cbam_fused(CBAM(16, 4), x)
    assert "CBAM" in str(info.value)


# ---------------------------------------------------------------- CBAM.forward's dispatch on the CPU
@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fused computations, from fused blocks and from CBAM modules."""
    calls = []
    for module in (blocks, function):
        original = module.cbam_fused
        monkeypatch.setattr(module, "cbam_fused", lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    return calls


def test_the_module_runs_the_kernels_with_and_without_gradients(native, kernel_calls):
    """``cbam`` registers the CPU kernel; CBAM.forward runs it (the same bits as cbam_fused), with gradients and
    without (then nothing is kept); inside reference_only() the reference path runs instead."""
    assert registered_kernels()["cpu"] is cpu_kernel
    m = _make(16)
    x = _x((2, 16, 5, 5))
    out = m(x.clone().requires_grad_())
    assert kernel_calls == [1]
    assert torch.equal(out, cbam_fused(copy.deepcopy(m), x.clone().requires_grad_()))
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m.eval()(x)
    assert kernel_calls == [1, 1] and saved == []
    with reference_only():
        ref = m(x)
        with reference_only():  # nested
            m(x)
        m(x)
    assert kernel_calls == [1, 1]
    torch.testing.assert_close(ref, m.forward_reference(x), rtol=0, atol=0)
    m(x)
    assert kernel_calls == [1, 1, 1]  # the kernels again after the block


@pytest.mark.parametrize("where", ["module", "channel.fc1", "spatial.conv", "spatial.norm"])
def test_hooks_see_what_they_saw_on_the_reference_path(native, kernel_calls, where):
    """A forward hook on a gate's own module makes that call compute the reference path (the kernels do not call the
    gate's modules), so the hook sees the module's output; a hook on the module itself sees the module's output, which
    the kernels compute."""
    m = _make(16)  # training mode: the spatial BatchNorm module runs (in eval the reference calls F.batch_norm)
    x = _x((2, 16, 5, 5))
    target = m if where == "module" else m.get_submodule(where)
    seen = []
    handle = target.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        out = m(x)
    finally:
        handle.remove()
    assert kernel_calls == ([1] if where == "module" else []) and len(seen) == 1
    expected = {"module": m.forward_reference(x), "channel.fc1": None, "spatial.conv": None, "spatial.norm": None}
    if where == "channel.fc1":
        expected[where] = m.channel.fc1(torch.stack([x.mean((2, 3)), x.amax((2, 3))]))
    elif where != "module":
        refined = m.channel(x)
        logits = m.spatial.conv(m.spatial.compressed(refined))
        expected["spatial.conv"] = logits
        expected["spatial.norm"] = m.spatial.logits(refined)
    torch.testing.assert_close(seen[0], expected[where])
    torch.testing.assert_close(out, m.forward_reference(x))
    kernel_calls.clear()
    m(x)
    assert kernel_calls == [1]  # hook removed: the kernels again


# ---------------------------------------------------------------- fused networks: global hooks, reference_only
def test_a_global_hook_sees_the_modules_that_run(native, kernel_calls):
    """A global module hook (as FlopCounterMode registers to follow the module tree) leaves the fused blocks fused: it
    sees the modules that run, the fused blocks and the modules they call."""
    torch.manual_seed(0)
    net = randomise_all(create_model("cifar_resnet20", attention="cbam", num_classes=10)).eval()
    fused = copy.deepcopy(net)
    fuse(fused)
    x = torch.randn(2, 3, 16, 16)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(m))
    try:
        with torch.no_grad():
            got = fused(x)
    finally:
        handle.remove()
    assert len(kernel_calls) == 9
    blocks_seen = [m for m in seen if isinstance(m, FusedBlock)]
    assert len(blocks_seen) == 9 and all(m.bn1 in seen and m.bn2 not in seen for m in blocks_seen)
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-5)


def test_reference_only_reaches_fused_blocks(native, kernel_calls):
    """Inside reference_only() every CBAM computes its reference path, in a fused network too."""
    torch.manual_seed(0)
    net = randomise_all(create_model("mobilenet_v1", attention="cbam", num_classes=10, width_mult=0.25)).eval()
    fused = copy.deepcopy(net)
    fuse(fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
        kernel_calls.clear()
        with reference_only():
            got = fused(x)
            assert kernel_calls == []
            torch.testing.assert_close(got, net(x), rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        fused(x)
    assert len(kernel_calls) == 27  # 27 CBAM modules, each in the kernels after the block


# ---------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_forward_backward_ties_and_channels_last(native):
    """The module compiled whole (its dispatch included) runs the kernels without a graph break: the reference's
    numbers, only x kept among the full-size tensors, the first maxima of exact ties, channels-last maps."""
    m = _make(16)
    fm = copy.deepcopy(m)
    compiled = torch.compile(fm, fullgraph=True)
    x = _x((2, 16, 6, 5))
    dout = torch.randn(x.shape)
    ref = _run(m, x, dout, fused=False)
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    out.backward(dout)
    _close(out, ref[0], 1e-5)
    _close(xc.grad, ref[1], 1e-5)
    for k, p in fm.named_parameters():
        _close(p.grad, ref[2][k], 1e-5)
    for k, b in fm.named_buffers():
        _close(b.float(), ref[3][k].float(), 1e-5)
    # the compiled graph keeps only x among the full-size tensors for backward: the kernels ran, not the reference
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compiled(xc)
    big = [t for t in saved if t.numel() * 2 > x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == xc.data_ptr()
    # exact ties in both max pools: the compiled path picks the same (first) maxima as the eager one
    tied = x.clone()
    tied[:, :, 0, 3] = tied[:, :, 4, 1] = tied.amax(dim=(2, 3)) + 1
    tied[:, 1] = tied[:, 0]
    with torch.no_grad():
        for mod in (m, fm):
            mod.channel.fc2.weight[1] = mod.channel.fc2.weight[0]
            mod.channel.fc2.bias[1] = mod.channel.fc2.bias[0]
    eager_x, comp_x = tied.clone().requires_grad_(), tied.clone().requires_grad_()
    cbam_fused(m, eager_x).backward(dout)
    compiled(comp_x).backward(dout)
    _close(comp_x.grad, eager_x.grad, 1e-5)
    # channels-last input, eval mode
    fm.load_state_dict(m.state_dict())  # the running statistics saw different numbers of steps above
    m.eval(), fm.eval()
    x_cl = x.contiguous(memory_format=CL)
    ref = _run(m, x_cl, dout, fused=False)
    xc = x_cl.clone().requires_grad_()
    out = compiled(xc)
    out.backward(dout)
    assert out.is_contiguous(memory_format=CL)
    _close(out, ref[0], 1e-5)
    _close(xc.grad, ref[1], 1e-5)
    for k, p in fm.named_parameters():
        _close(p.grad, ref[2][k], 1e-5, 0.01 * max(float(g.abs().max()) for g in ref[2].values()))


# ---------------------------------------------------------------- the tail of a residual block: relu(cbam(x) + r)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", [{}, {"spatial": False}], ids=["cbam", "channel_only"])
def test_residual_addition_and_relu(native, fmt, training, kwargs):
    m = _make(16, **kwargs).train(training)
    x = _x((3, 16, 6, 5), fmt=fmt)
    r = _x((3, 16, 6, 5), seed=4, fmt=CL if fmt == torch.contiguous_format else torch.contiguous_format)
    dout = torch.randn(x.shape)
    fm = copy.deepcopy(m)
    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    expected = torch.relu(m.forward_reference(xr) + rr)
    expected.backward(dout)
    xf, rf = x.clone().requires_grad_(), r.clone().requires_grad_()
    got = cbam_fused(fm, xf, residual=rf)
    got.backward(dout)
    assert (got == 0).any() and (got > 0).any()  # the ReLU's mask matters
    _close(got, expected, 1e-5)
    _close(xf.grad, xr.grad, 1e-5)
    _close(rf.grad, rr.grad, 1e-5)
    largest = max(float(p.grad.abs().max()) for p in m.parameters())
    for (k, p), q in zip(m.named_parameters(), fm.parameters(), strict=True):
        if not k.endswith("conv.bias"):
            _close(q.grad, p.grad, 1e-5, 0.01 * largest)
    with torch.no_grad():  # eval without gradients: the single inference operator
        me = copy.deepcopy(m).eval()
        _close(cbam_fused(copy.deepcopy(me), x, residual=r), torch.relu(me.forward_reference(x) + r), 1e-5)


def test_residual_gradcheck_float64(native):
    m = _make(8, reduction=2).double()
    x = _x((2, 8, 3, 4), dtype=torch.double).requires_grad_()
    r = _x((2, 8, 3, 4), seed=3, dtype=torch.double).requires_grad_()
    tail = _FusedTail(m)
    names = [k for k, _ in tail.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in tail.parameters()]

    def f(x, r, *ps):
        return torch.func.functional_call(tail, dict(zip(names, ps, strict=True)), (x, r))

    assert torch.autograd.gradcheck(f, (x, r, *params), eps=1e-6, atol=1e-5)


class _FusedTail(nn.Module):
    def __init__(self, m: CBAM) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return cbam_fused(self.m, x, residual=r)


def test_residual_keeps_only_the_input_and_the_output(native):
    m = _make(64)
    x = _x((4, 64, 12, 12)).requires_grad_()
    r = _x((4, 64, 12, 12), seed=2).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = cbam_fused(m, x, residual=r)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() * 2 > x.numel()}
    assert big == {x.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()}


def test_residual_must_match_the_input():
    m = CBAM(16, 4)
    with pytest.raises(ValueError, match="residual must match the input's shape"):
        cbam_fused(m, torch.randn(2, 16, 4, 4), residual=torch.randn(2, 16, 4, 5))
    with pytest.raises(ValueError, match="float64"):
        cbam_fused(m, torch.randn(2, 16, 4, 4), residual=torch.randn(2, 16, 4, 4, dtype=torch.float64))
