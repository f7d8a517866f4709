"""CBAM and its gates against hand-computed values, the presets, every option and every bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbam import CBAM, ChannelGate, SpatialGate
from cbam.layers import PRESETS, dispatch, reference_only


def _set(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(values, dtype=param.dtype).reshape(param.shape))


TINY = torch.tensor(
    [[[[1.0, 2.0], [3.0, 6.0]], [[-1.0, 0.0], [4.0, -3.0]]]]
)  # (1, 2, 2, 2): channel 0 avg 3 max 6; channel 1 avg 0 max 4


# ---------------------------------------------------------------- hand-computed values
def test_channel_gate_matches_hand_computation():
    gate = ChannelGate(2, hidden=1)
    _set(gate.fc1.weight, [[1.0, -1.0]])
    _set(gate.fc1.bias, [0.5])
    _set(gate.fc2.weight, [[1.0], [2.0]])
    _set(gate.fc2.bias, [0.0, -1.0])
    # avg = (3, 0): hidden relu(3 - 0 + .5) = 3.5 -> (3.5, 6.0); max = (6, 4): relu(6 - 4 + .5) = 2.5 -> (2.5, 4.0)
    logits = torch.tensor([3.5 + 2.5, 6.0 + 4.0])
    expected = TINY * torch.sigmoid(logits)[None, :, None, None]
    torch.testing.assert_close(gate(TINY), expected)
    torch.testing.assert_close(gate.logits(TINY).flatten(), logits)


@pytest.mark.parametrize(
    "pool, value",
    [
        ("avg", [3.0, 0.0]),
        ("max", [6.0, 4.0]),
        ("lp", [math.sqrt(1 + 4 + 9 + 36), math.sqrt(1 + 0 + 16 + 9)]),
        ("lse", [math.log(sum(math.exp(v) for v in (1, 2, 3, 6))), math.log(sum(math.exp(v) for v in (-1, 0, 4, -3)))]),
    ],
)
def test_each_pool_type_by_hand(pool, value):
    gate = ChannelGate(2, hidden=1, pool_types=[pool], bias=False)
    _set(gate.fc1.weight, [[1.0, 0.0]])  # hidden = relu(pooled channel 0)
    _set(gate.fc2.weight, [[1.0], [1.0]])
    expected = torch.tensor([max(value[0], 0.0)] * 2)
    torch.testing.assert_close(gate.logits(TINY).flatten(), expected)


def test_lse_pool_is_stable_for_large_values():
    gate = ChannelGate(2, hidden=1, pool_types=["lse"])
    out = gate(TINY * 1e4)
    assert torch.isfinite(out).all()


def test_spatial_gate_matches_hand_computation():
    gate = SpatialGate(2, kernel_size=1, norm=False, bias=True)
    _set(gate.conv.weight, [[[[2.0]], [[-1.0]]]])  # 2 * mean_c - max_c + 0.25
    _set(gate.conv.bias, [0.25])
    mean_c = TINY.mean(1)
    max_c = TINY.amax(1)
    expected = TINY * torch.sigmoid(2 * mean_c - max_c + 0.25)[:, None]
    torch.testing.assert_close(gate(TINY), expected)


def test_spatial_conv_input_order_is_avg_then_max_and_zero_padded():
    gate = SpatialGate(2, kernel_size=3, norm=False)
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0, 0, 0] = 1.0  # reads the channel-average map one step up-left
    _set(gate.conv.weight, w)
    logits = gate.logits(TINY)[0, 0]
    mean_c = TINY.mean(1)[0]
    expected = torch.tensor([[0.0, 0.0], [0.0, mean_c[0, 0].item()]])
    torch.testing.assert_close(logits, expected)


def test_spatial_conv_compression():
    gate = SpatialGate(2, kernel_size=1, compress="conv", norm=False)
    assert gate.conv.weight.shape == (1, 1, 1, 1) and gate.compress.weight.shape == (1, 2, 1, 1)
    _set(gate.compress.weight, [[[[1.0]], [[1.0]]]])
    _set(gate.conv.weight, [[[[1.0]]]])
    expected = TINY * torch.sigmoid(TINY.sum(1, keepdim=True))
    torch.testing.assert_close(gate(TINY), expected)


def test_cbam_starts_with_spatial_gate_at_one_half():
    torch.manual_seed(0)
    m = CBAM(32)
    x = torch.randn(4, 32, 6, 6)
    for mode in (m.train, m.eval):
        mode()
        channel_refined = m.channel(x)
        torch.testing.assert_close(m(x), channel_refined * 0.5)


def _random_bn(m: nn.Module) -> None:
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)


@pytest.mark.parametrize("arrangement", ["channel_first", "spatial_first", "parallel"])
def test_arrangements_compose_the_gates(arrangement):
    torch.manual_seed(1)
    m = CBAM(16, 4, arrangement=arrangement).eval()
    _random_bn(m)
    x = torch.randn(2, 16, 5, 5)
    c = lambda t: torch.sigmoid(m.channel.logits(t))  # noqa: E731
    s = lambda t: torch.sigmoid(m.spatial.logits(t))  # noqa: E731
    if arrangement == "channel_first":
        y = x * c(x)
        expected = y * s(y)
    elif arrangement == "spatial_first":
        y = x * s(x)
        expected = y * c(y)
    else:
        expected = x * torch.sigmoid(m.channel.logits(x) + m.spatial.logits(x))
    torch.testing.assert_close(m(x), expected)


def test_channel_only():
    m = CBAM(16, 4, spatial=False)
    assert m.spatial is None and not any(k.startswith("spatial") for k in m.state_dict())
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(m(x), m.channel(x))


# ---------------------------------------------------------------- state-dict contract and presets
def test_state_dict_contract_paper():
    m = CBAM(64)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "channel.fc1.weight": (4, 64),
        "channel.fc1.bias": (4,),
        "channel.fc2.weight": (64, 4),
        "channel.fc2.bias": (64,),
        "spatial.conv.weight": (1, 2, 7, 7),
        "spatial.norm.weight": (1,),
        "spatial.norm.bias": (1,),
        "spatial.norm.running_mean": (1,),
        "spatial.norm.running_var": (1,),
        "spatial.norm.num_batches_tracked": (),
    }
    assert m.spatial.norm.momentum == 0.01 and m.spatial.norm.eps == 1e-5
    assert m.spatial.norm.weight.item() == 0.0 and m.spatial.norm.bias.item() == 0.0
    assert torch.all(m.channel.fc1.bias == 0) and torch.all(m.channel.fc2.bias == 0)


def test_explicit_options_override_preset():
    m = CBAM(64, 8, hidden=5, spatial_bias=True, spatial_norm=False, mlp_bias=False, kernel_size=3)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "channel.fc1.weight": (5, 64),
        "channel.fc2.weight": (64, 5),
        "spatial.conv.weight": (1, 2, 3, 3),
        "spatial.conv.bias": (1,),
    }
    assert CBAM(64, 8).channel.hidden == 8


def test_seed_preset_matches_the_tf1_snippet():
    """The TF1 snippet's computation, re-derived in NHWC: dense layers on [avg; max], summed; SAME conv."""
    torch.manual_seed(2)
    m = CBAM(8, preset="seed")
    assert m.channel.hidden == 4 and m.spatial.norm is None and m.spatial.conv.bias is not None
    x = torch.randn(2, 8, 5, 5)
    nhwc = x.permute(0, 2, 3, 1)
    stacked = torch.stack([nhwc.mean((1, 2)), nhwc.amax((1, 2))], 1)  # (N, 2, C)
    fc1 = torch.relu(stacked @ m.channel.fc1.weight.T + m.channel.fc1.bias)
    att = torch.sigmoid((fc1 @ m.channel.fc2.weight.T + m.channel.fc2.bias).sum(1))
    refined = nhwc * att[:, None, None, :]
    maps = torch.stack([refined.mean(3), refined.amax(3)], 1)
    spatial = torch.sigmoid(F.conv2d(maps, m.spatial.conv.weight, m.spatial.conv.bias, padding="same"))
    expected = (refined * spatial.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("channels", [64, 24])
def test_timm_preset_matches_timm_cbam_module(channels):
    timm_cbam = pytest.importorskip("timm.layers.cbam")
    torch.manual_seed(3)
    ref = timm_cbam.CbamModule(channels)
    ours = CBAM(channels, preset="timm")
    assert ours.channel.hidden == ref.channel.fc1.out_channels
    assert ours.spatial.norm.momentum == ref.spatial.conv.bn.momentum == 0.1
    sd = ref.state_dict()
    mapped = {
        "channel.fc1.weight": sd["channel.fc1.weight"].flatten(1),
        "channel.fc2.weight": sd["channel.fc2.weight"].flatten(1),
        "spatial.conv.weight": sd["spatial.conv.conv.weight"],
        **{
            f"spatial.norm.{k}": sd[f"spatial.conv.bn.{k}"]
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        },
    }
    ours.load_state_dict(mapped, strict=True)
    x = torch.randn(3, channels, 7, 7)
    torch.testing.assert_close(ours(x), ref(x))  # training mode: batch statistics, same BN update
    torch.testing.assert_close(ours.spatial.norm.running_mean, ref.spatial.conv.bn.running_mean)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_every_preset_runs_forward_and_backward():
    for name in PRESETS:
        m = CBAM(32, preset=name)
        x = torch.randn(2, 32, 4, 4, requires_grad=True)
        m(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- gradients, formats, dtypes
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"arrangement": "spatial_first"},
        {"arrangement": "parallel"},
        {"pool_types": ("avg", "max", "lp", "lse")},
        {"spatial_compress": "conv", "kernel_size": 3},
        {"preset": "seed"},
        {"spatial": False},
    ],
)
def test_gradcheck_float64(kwargs):
    torch.manual_seed(4)
    m = CBAM(8, 2, **kwargs).double()
    _random_bn(m)
    x = torch.randn(2, 8, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_equals_contiguous_and_keeps_format(training):
    torch.manual_seed(5)
    m = CBAM(32, arrangement="channel_first").train(training)
    x = torch.randn(4, 32, 9, 7)
    ref = m(x)
    out = m(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref.is_contiguous()
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("shape", [(1, 16, 1, 1), (1, 16, 1, 5), (3, 16, 1, 1), (1, 16, 13, 2)])
def test_any_batch_and_spatial_size(shape):
    m = CBAM(16, 4)
    for training in (True, False):
        m.train(training)
        out = m(torch.randn(shape))
        assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float32(dtype):
    torch.manual_seed(6)
    m = CBAM(32).eval()
    _random_bn(m)
    x = torch.randn(2, 32, 8, 8)
    ref = m(x)
    out = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_under_cpu_autocast():
    m = CBAM(32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(7)
    m = CBAM(32)
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(m.cuda()(x.cuda()).cpu(), m.cpu()(x), atol=1e-5, rtol=1e-4)


@pytest.mark.compiler
def test_torch_compile_fullgraph():
    torch.manual_seed(8)
    m = CBAM(16, 4)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, m(x))
    out.sum().backward()
    assert x.grad is not None


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.randn(16, 4, 4), ValueError, "4-D"),
        (torch.randn(1, 2, 16, 4, 4), ValueError, "4-D"),
        (torch.randn(2, 8, 4, 4), ValueError, "expected 16 channels, got 8"),
        (torch.ones(2, 16, 4, 4, dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones(2, 16, 4, 4, dtype=torch.bool), TypeError, "floating-point"),
    ],
)
def test_bad_inputs(x, error, words):
    for module in (CBAM(16, 4), ChannelGate(16, 4), SpatialGate(16)):
        with pytest.raises(error, match=words) as info:
            module(x)
        assert type(module).__name__ in str(info.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"kernel_size": 4}, "odd"),
        ({"kernel_size": 0}, "odd"),
        ({"kernel_size": -3}, "odd"),
        ({"reduction": 32}, "no hidden unit"),
        ({"reduction": 0}, "positive integer"),
        ({"hidden": 0}, "positive integer"),
        ({"pool_types": ("avg", "median")}, "unknown pool type 'median'"),
        ({"pool_types": ()}, "non-empty"),
        ({"arrangement": "sideways"}, "unknown arrangement 'sideways'"),
        ({"preset": "keras"}, "unknown preset 'keras'"),
        ({"spatial_compress": "fft"}, "unknown spatial compression"),
        ({"spatial": False, "arrangement": "parallel"}, "needs the spatial gate"),
        ({"gate": "softmax"}, "unknown gate"),
    ],
)
def test_bad_configuration(kwargs, words):
    with pytest.raises(ValueError, match=words) as info:
        CBAM(16, **kwargs)
    assert "CBAM" in str(info.value) or "ChannelGate" in str(info.value) or "SpatialGate" in str(info.value)


def test_bad_channel_count():
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        CBAM(0)


# ---------------------------------------------------------------- dispatch
def test_forward_dispatches_by_device_to_the_registered_kernel(monkeypatch):
    """CBAM.forward runs the kernel registered for its input's device type; a kernel returning None, or
    reference_only(), leaves the call to the reference path, which forward_reference always computes."""
    monkeypatch.setattr(dispatch, "_KERNELS", {})  # this test's registrations end with it
    torch.manual_seed(9)
    m = CBAM(16, 4)
    x = torch.randn(2, 16, 5, 5)
    expected = m.forward_reference(x)
    calls = []

    def kernel(module, t):
        calls.append((module, t))
        return None if len(calls) == 1 else torch.zeros_like(t)

    dispatch.register_kernel("meta", kernel)  # another device's kernel is not asked
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    dispatch.register_kernel("cpu", kernel)
    assert dispatch.registered_kernels() == {"meta": kernel, "cpu": kernel}
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)  # the kernel declined
    assert torch.equal(m(x), torch.zeros_like(x)) and calls[-1] == (m, x)
    with reference_only():
        torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    assert len(calls) == 2
    torch.testing.assert_close(m.forward_reference(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 16 channels"):  # inputs are checked before any kernel runs
        m(torch.randn(2, 8, 5, 5))
    assert len(calls) == 2


def test_register_kernel_checks_its_arguments(monkeypatch):
    monkeypatch.setattr(dispatch, "_KERNELS", {})
    with pytest.raises(TypeError, match="expected a device type"):
        dispatch.register_kernel("", lambda m, x: None)
    with pytest.raises(TypeError, match="expected a callable"):
        dispatch.register_kernel("cpu", None)


def test_reset_parameters_without_an_argument_follows_the_preset():
    """``reset_parameters()`` re-initialises as the module's preset does (timm: spatial BN weight 1; paper: 0)."""
    timm_like = CBAM(64, preset="timm")
    timm_like.reset_parameters()
    assert torch.equal(timm_like.spatial.norm.weight, torch.ones(1))
    paper = CBAM(64)
    paper.reset_parameters()
    assert torch.equal(paper.spatial.norm.weight, torch.zeros(1))
