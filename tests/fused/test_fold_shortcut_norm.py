"""A downsampling shortcut's BatchNorm folded into the inference operator's output pass:
``cbam_fused(m, y, s, norm=bn, residual_norm=sbn)`` computes ``relu(m(bn(y)) + sbn(s))`` without writing ``sbn(s)``
at inference (running statistics, no gradients); anywhere else ``sbn`` runs on its own, with the same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from fused_helpers import randomise, randomise_all
from torch import nn

from cbam import CBAM, create_model, fuse
from cbam.fused.blocks import FusedBasicBlock, split_shortcut
from cbam.fused.function import cbam_fused
from cbam.layers import reference_only
from cbam.models.resnet import BasicBlock

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("native")


def _modules(channels: int, dtype=torch.float32, cbam_kwargs=None, **shortcut_kwargs):
    torch.manual_seed(0)
    m = CBAM(channels, reduction=4, **(cbam_kwargs or {})).to(dtype).eval()
    bn = randomise(nn.BatchNorm2d(channels)).to(dtype).eval()
    sbn = randomise(nn.BatchNorm2d(channels, **shortcut_kwargs)).to(dtype).eval()
    return m, bn, sbn


class _Calls:
    """Counts the calls of a module's forward (without hooks, which would stop the fold)."""

    def __init__(self, module: nn.Module) -> None:
        self.count, self.forward = 0, module.forward
        module.forward = self

    def __call__(self, *args):
        self.count += 1
        return self.forward(*args)


CONFIGS = {"paper": {}, "channel-only": {"spatial": False}, "max-only": {"pool_types": ("max",)}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_folded_at_inference_matches_batchnorm_then_reference(dtype, fmt, config):
    m, bn, sbn = _modules(24, dtype, CONFIGS[config])
    calls = _Calls(sbn)
    y = (torch.randn(5, 24, 7, 9, dtype=dtype) * 2 + 0.7).contiguous(memory_format=fmt)
    s = (torch.randn(5, 24, 7, 9, dtype=dtype) - 0.3).contiguous(memory_format=fmt)
    with torch.no_grad():
        got = cbam_fused(m, y, s, norm=bn, residual_norm=sbn)
        assert calls.count == 0  # folded: the shortcut's BatchNorm never ran on its own
        expected = torch.relu(m.forward_reference(bn(y)) + sbn(s))
    assert got.is_contiguous(memory_format=fmt)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def test_without_affine_parameters_and_in_bfloat16():
    m, bn, sbn = _modules(16, affine=False)
    y, s = torch.randn(4, 16, 6, 6), torch.randn(4, 16, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            cbam_fused(m, y, s, norm=bn, residual_norm=sbn), torch.relu(m.forward_reference(bn(y)) + sbn(s))
        )
        m16, bn16, sbn16 = (copy.deepcopy(t).bfloat16() for t in (m, bn, sbn))
        got = cbam_fused(m16, y.bfloat16(), s.bfloat16(), norm=bn16, residual_norm=sbn16)
        exact = torch.relu(
            m16.double().forward_reference(bn16.double()(y.bfloat16().double())) + sbn16.double()(s.bfloat16().double())
        )
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=3e-2, atol=3e-2 * float(exact.abs().max()))


def test_with_gradients_or_batch_statistics_the_batchnorm_runs_on_its_own():
    """Training (batch statistics, running-statistics update) and gradients through an eval-mode module: the shortcut's
    BatchNorm runs as a module, so its statistics and every gradient are BatchNorm's own."""
    m, bn, sbn = _modules(12)
    y, s, dout = torch.randn(3, 12, 5, 5), torch.randn(3, 12, 5, 5), torch.randn(3, 12, 5, 5)
    for training in (True, False):
        results = []
        for folded in (True, False):
            mm, bb, ss = (copy.deepcopy(t).train(training) for t in (m, bn, sbn))
            calls = _Calls(ss)
            yy, sv = y.clone().requires_grad_(), s.clone().requires_grad_()
            if folded:
                out = cbam_fused(mm, yy, sv, norm=bb, residual_norm=ss)
                assert calls.count == 1
            else:
                out = torch.relu(mm.forward_reference(bb(yy)) + ss(sv))
            out.backward(dout)
            params = (*mm.parameters(), *bb.parameters(), *ss.parameters())
            results.append([out, yy.grad, sv.grad, *(p.grad for p in params), *(b.clone() for b in ss.buffers())])
        for got, expected in zip(*results, strict=True):
            torch.testing.assert_close(
                got, expected, rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()) + 1e-7
            )


def test_with_the_attentions_own_batch_statistics_the_shortcut_batchnorm_runs_on_its_own():
    """No gradients, but the spatial BatchNorm in training (batch statistics): the module takes the multi-operator
    path, and the shortcut's BatchNorm runs before it."""
    m, bn, sbn = _modules(8)
    m.spatial.train()
    ref = copy.deepcopy(m)
    calls = _Calls(sbn)
    y, s = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        got = cbam_fused(m, y, s, norm=bn, residual_norm=sbn)
        assert calls.count == 1
        expected = torch.relu(ref.forward_reference(bn(y)) + sbn(s))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(m.spatial.norm.running_mean, ref.spatial.norm.running_mean)


def test_a_hooked_batchnorm_is_not_folded():
    m, bn, sbn = _modules(8)
    seen = []
    handle = sbn.register_forward_hook(lambda mod, args, out: seen.append(out))
    y, s = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        got = cbam_fused(m, y, s, norm=bn, residual_norm=sbn)
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], sbn(s))
    torch.testing.assert_close(got, torch.relu(m.forward_reference(bn(y)) + seen[0]))


def test_residual_norm_needs_a_residual_and_the_operator_checks_its_arguments():
    m, bn, sbn = _modules(8)
    y = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="residual_norm needs a residual"):
        cbam_fused(m, y, norm=bn, residual_norm=sbn)
    w1, w2, one = torch.randn(2, 8), torch.randn(8, 2), torch.ones(1)

    def call(residual, **res_affine):  # channel gate only, identity spatial normalisation
        args = (y, w1, None, w2, None, True, True, None, None, one, one * 0, residual)
        return torch.ops.cbam_cpu.forward_inference(*args, **res_affine)

    with pytest.raises(RuntimeError, match="a residual scale and shift need a residual"):
        call(None, res_scale=torch.ones(8), res_shift=torch.zeros(8))
    with pytest.raises(RuntimeError, match="the residual scale and shift come together"):
        call(y, res_scale=torch.ones(8))
    with pytest.raises(RuntimeError, match="residual shift"):
        call(y, res_scale=torch.ones(8), res_shift=torch.zeros(4))


def test_split_shortcut():
    """Before a CBAM, torchvision's downsampling shortcut (conv1x1, BatchNorm2d) runs without its BatchNorm, which is
    handed back; an identity or another form runs whole."""
    x = torch.randn(2, 4, 6, 6)
    conv, norm = nn.Conv2d(4, 8, 1, stride=2, bias=False), randomise(nn.BatchNorm2d(8)).eval()
    downsample = nn.Sequential(conv, norm)
    assert split_shortcut(None, x) == (x, None)
    out, left = split_shortcut(downsample, x)
    assert left is norm
    torch.testing.assert_close(out, conv(x))
    for whole in (nn.Sequential(nn.Sequential(conv, norm)), conv, nn.Sequential(norm.__class__(4).eval())):
        out, left = split_shortcut(whole, x)
        assert left is None
        torch.testing.assert_close(out, whole(x))


@pytest.mark.parametrize("observed", ["downsample", "downsample.1", "downsample.0"])
def test_a_hooked_shortcut_runs_whole_in_a_fused_block(observed):
    """A hook on the shortcut (or a module inside it) of a fused block: the block runs its plain forward, so the hook
    sees what it saw before fusion, and the numbers are the same."""
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), randomise(nn.BatchNorm2d(16)))
    block = BasicBlock(8, 16, 2, downsample=downsample, attn_layer=CBAM, attn_kwargs={"reduction": 4})
    randomise_all(block).eval()
    fused = copy.deepcopy(block)
    assert fuse(fused) == [""] and type(fused) is FusedBasicBlock
    x = torch.randn(2, 8, 8, 8)
    seen = {}
    for label, net in (("plain", block), ("fused", fused)):
        handle = net.get_submodule(observed).register_forward_hook(lambda m, a, out, k=label: seen.setdefault(k, out))
        with torch.no_grad():
            out = net(x)
        handle.remove()
        seen[label + " out"] = out
    torch.testing.assert_close(seen["fused"], seen["plain"], rtol=0, atol=0)
    torch.testing.assert_close(seen["fused out"], seen["plain out"], rtol=1e-5, atol=1e-6)


def _networks(name: str, fmt: torch.memory_format) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """An eval-mode ResNet with every BatchNorm's statistics moved away from the identity, its fused copy, an input."""
    torch.manual_seed(0)
    separate = randomise_all(create_model(name, attention="cbam", num_classes=10)).eval()
    fused = copy.deepcopy(separate)
    assert fuse(fused)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    return fused.to(memory_format=fmt), separate.to(memory_format=fmt), x


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_networks_at_inference_give_the_same_numbers(name, fmt):
    """The fused network (shortcut BatchNorms folded: they never run as modules) against the unfused one on the
    reference path."""
    fused, separate, x = _networks(name, fmt)
    norms = [b.downsample[-1] for b in fused.modules() if getattr(b, "downsample", None) is not None]
    counters = [_Calls(n) for n in norms]
    with torch.no_grad():
        with reference_only():
            expected = separate(x)
        got = fused(x)
    assert counters and all(c.count == 0 for c in counters)
    assert got.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("resnet50", CL),
        pytest.param("resnet18", CL, marks=pytest.mark.slow),
        pytest.param("resnet18", torch.contiguous_format, marks=pytest.mark.slow),
        pytest.param("resnet50", torch.contiguous_format, marks=pytest.mark.slow),
    ],
    ids=["resnet50-channels_last", "resnet18-channels_last", "resnet18-nchw", "resnet50-nchw"],
)
def test_compiled_networks_at_inference_give_the_same_numbers(name, fmt):
    """The same, compiled (about 10 s a network: one case by default, the others with -m slow)."""
    fused, separate, x = _networks(name, fmt)
    with torch.no_grad():
        with reference_only():
            expected = separate(x)
        torch.testing.assert_close(torch.compile(fused)(x), expected, rtol=1e-5, atol=1e-5)
