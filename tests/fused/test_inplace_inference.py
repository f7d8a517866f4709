"""The inference operator writing a block's output over the block's last convolution output (``inplace``):
``cbam_cpu::forward_inference_`` gives exactly what ``forward_inference`` returns, fused blocks hand their
convolution's output over only when no hook sees it, and a compiled fused network runs the operator in place (no copy
of the map)."""

from __future__ import annotations

import pytest
import torch
from fused_helpers import randomise, randomise_all
from torch import nn
from torch._inductor.utils import run_and_get_code

from cbam import CBAM, create_model, fuse
from cbam.fused.function import cbam_fused
from cbam.models.resnet import BasicBlock

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("native")


def catch_output(module: nn.Module, caught: list[torch.Tensor]) -> None:
    """Appends each output of ``module`` to ``caught``, without a hook (a hook would stop the in-place write)."""
    forward = module.forward
    module.forward = lambda *args: caught.append(forward(*args)) or caught[-1]


def _operator_args(c: int, dtype: torch.dtype, case: str, residual: torch.Tensor | None):
    """Everything after x for forward_inference(_): weights in the compute dtype, the case's optional parts."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(1)

    def rand(*shape, lo=-0.5, hi=0.5):
        return torch.rand(*shape, generator=g, dtype=cd) * (hi - lo) + lo

    conv = None if case == "channel-only" else rand(1, 2, 7, 7)
    args = [rand(c // 4, c), rand(c // 4), rand(c, c // 4), rand(c), True, True, conv, None]
    args += [rand(1, lo=0.5, hi=1.5), rand(1), residual]
    if case == "folded":  # a BatchNorm in front and one on the shortcut, both folded
        args += [rand(c, lo=0.5, hi=1.5), rand(c), rand(c, lo=0.5, hi=1.5), rand(c)]
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["folded", "residual", "no-residual", "channel-only"])
def test_in_place_operator_writes_exactly_what_the_other_returns(dtype, fmt, case):
    torch.manual_seed(0)
    x = torch.randn(3, 16, 9, 7, dtype=dtype).contiguous(memory_format=fmt)
    residual = None if case == "no-residual" else torch.randn_like(x)
    args = _operator_args(16, dtype, case, residual)
    expected = torch.ops.cbam_cpu.forward_inference(x, *args)
    where = x.data_ptr()
    assert torch.ops.cbam_cpu.forward_inference_(x, *args) is None
    assert x.data_ptr() == where and x.is_contiguous(memory_format=fmt)
    assert torch.equal(x, expected)


def test_in_place_operator_with_a_strided_input_or_an_overlapping_residual():
    """x that the kernels would copy first, a residual that is x itself, and one that overlaps x at an offset: x
    still ends up holding the result computed from the values before the call."""
    torch.manual_seed(0)
    shape = (2, 8, 5, 6)
    numel = 2 * 8 * 5 * 6

    def check(x, residual):
        args = _operator_args(8, torch.float32, "residual", residual.clone())
        expected = torch.ops.cbam_cpu.forward_inference(x.clone(), *args)
        args[10] = residual
        torch.ops.cbam_cpu.forward_inference_(x, *args)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)

    wide = torch.randn(2, 8, 5, 12)
    check(wide[..., ::2], torch.randn(shape))  # strided: computed aside, then copied in
    x = torch.randn(shape)
    check(x, x)  # the residual is x: every element is read before its place is written
    base = torch.randn(numel + 40)
    check(base[:numel].view(shape), base[40:].view(shape))  # partial overlap: computed aside


def test_in_place_operator_registration():
    """Schema (x mutated, nothing returned), fake implementation and AOT tracing, as torch.compile uses them."""
    x = torch.randn(2, 8, 5, 5)
    args = _operator_args(8, torch.float32, "folded", torch.randn_like(x))
    torch.library.opcheck(
        torch.ops.cbam_cpu.forward_inference_.default,
        (x, *args),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_inplace_overwrites_x_only_at_inference():
    """cbam_fused(..., inplace=True) writes the result over x only where the single inference operator runs;
    without ``inplace`` x is the caller's and is left alone."""
    torch.manual_seed(0)
    m, bn, sbn = CBAM(16, reduction=4).eval(), randomise(nn.BatchNorm2d(16)).eval(), randomise(nn.BatchNorm2d(16))
    sbn.eval()
    y, s = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    expected = torch.relu(m.forward_reference(bn(y)) + sbn(s)).detach()

    with torch.no_grad():
        kept = y.clone()
        out = cbam_fused(m, kept, s, norm=bn, residual_norm=sbn)  # inplace not given: y is the caller's
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(kept, y)
        given = y.clone()
        out = cbam_fused(m, given, s, norm=bn, residual_norm=sbn, inplace=True)
        assert out.data_ptr() == given.data_ptr()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    given = y.clone()  # with gradients (the module's parameters need them) nothing is overwritten
    out = cbam_fused(m, given, s, norm=bn, residual_norm=sbn, inplace=True)
    assert torch.equal(given, y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    m.train()
    with torch.no_grad():  # batch statistics in the spatial gate: several operators, x left alone
        given = y.clone()
        cbam_fused(m, given, s, norm=bn, residual_norm=sbn, inplace=True)
        assert torch.equal(given, y)


def test_residual_tail_of_a_fused_block_overwrites_the_convolution_output_at_inference():
    """FusedBlock.residual_tail(norm, attn, x, shortcut, shortcut_norm) is relu(attn(norm(x)) + shortcut_norm(shortcut))
    for the output x of the block's last convolution, which it overwrites only at inference."""
    torch.manual_seed(0)
    block = BasicBlock(16, 16, attn_layer=CBAM, attn_kwargs={"reduction": 4})
    randomise_all(block).eval()
    sbn = randomise(nn.BatchNorm2d(16)).eval()
    assert fuse(block) == [""]
    y, s = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    expected = torch.relu(block.attn.forward_reference(block.bn2(y)) + sbn(s)).detach()
    for shortcut_norm, shortcut in ((sbn, s), (None, sbn(s).detach())):
        with torch.no_grad():
            given = y.clone()
            out = block.residual_tail(block.bn2, block.attn, given, shortcut, shortcut_norm)
        assert out.data_ptr() == given.data_ptr()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        given = y.clone()
        out = block.residual_tail(block.bn2, block.attn, given, shortcut, shortcut_norm)  # gradients: x kept
        assert torch.equal(given, y) and out.requires_grad
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    block.train()
    with torch.no_grad():  # batch statistics: several operators, x left alone
        given = y.clone()
        block.residual_tail(block.bn2, block.attn, given, s, sbn)
        assert torch.equal(given, y)


@pytest.mark.parametrize(
    "name,conv,after",
    [
        ("resnet18", "conv2", None),
        ("resnet50", "conv3", None),
        ("cifar_resnet20", "conv2", None),
        ("mobilenet_v1", "conv_pw", "act_pw"),
    ],
)
def test_a_hooked_convolution_keeps_its_output(name, conv, after):
    """In a fused network, a hook that keeps a layer's convolution output (a feature extractor) finds it intact after
    the attention ran; without hooks the attention's output (the block's, or what the activation after it reads) goes
    over it. The network gives the same numbers either way (up to rounding: while the hook is there, its block runs
    its plain forward, the BatchNorm not folded)."""
    torch.manual_seed(0)
    net = randomise_all(create_model(name, attention="cbam", num_classes=10)).eval()
    assert fuse(net)
    x = torch.randn(2, 3, 32, 32)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    block = next(b for b in net.modules() if hasattr(b, conv) and any(hasattr(b, a) for a in ("attn", "attn_pw")))
    handle = getattr(block, conv).register_forward_hook(lambda mod, args, out: seen.append((out, out.clone())))
    with torch.no_grad():
        hooked = net(x)
        handle.remove()
        ((held, copy_at_the_time),) = seen
        assert torch.equal(held, copy_at_the_time)
        # unobserved: the convolution's output and the attention's output, caught without hooks, share memory
        caught: list[torch.Tensor] = []
        catch_output(getattr(block, conv), caught)
        if after is None:
            catch_output(block, caught)
        else:  # what the activation after the attention reads
            activation, act = getattr(block, after), getattr(block, after).forward
            activation.forward = lambda t: caught.append(t) or act(t)
        plain = net(x)
    conv_out, attn_out = caught
    assert conv_out.data_ptr() == attn_out.data_ptr()
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)


def test_compiled_network_runs_the_operator_in_place():
    """Inductor re-inplaces the functionalised operator onto the convolution's output: the generated code of a fused
    network calls forward_inference_ and copies no map for it, and gives the eager numbers."""
    torch.manual_seed(0)
    net = randomise_all(create_model("resnet18", attention="cbam", num_classes=10)).eval()
    assert len(fuse(net)) == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
        got, codes = run_and_get_code(torch.compile(net), x)
    code = "\n".join(codes)
    assert code.count("cbam_cpu.forward_inference_.default(") == 8
    assert "clone" not in code and "auto_functionalized" not in code
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
