"""``cbam.fuse``: on every registered network the fused model computes what the plain model computes (outputs,
gradients, running statistics), with the same state dict, and hooks see what they saw; and SyncBatchNorm networks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cbam
from cbam.fused import FusedBlock, fused_types, register_fusion
from cbam.layers import reference_only
from cbam.models import create_model, list_models, model_meta
from cbam.models.resnet import BasicBlock

pytestmark = pytest.mark.usefixtures("native")

ALL_NETWORKS = list_models()


def _expected_paths(model: nn.Module) -> list[str]:
    registry = fused_types()
    return [
        path
        for path, m in model.named_modules()
        if type(m) in registry and all(isinstance(getattr(m, s), cbam.CBAM) for s in registry[type(m)].attention_slots)
    ]


def _randomise_norms(model: nn.Module) -> None:
    """BatchNorms away from their identity start, so a wrongly folded one shows (the spatial ones included)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.empty_like(m.bias).uniform_(-0.3, 0.3, generator=g))
                m.running_mean.copy_(torch.empty_like(m.running_mean).uniform_(-0.3, 0.3, generator=g))
                m.running_var.copy_(torch.empty_like(m.running_var).uniform_(0.5, 1.5, generator=g))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    scale = b.abs().max().clamp_min(1e-6)
    assert ((a - b).abs().max() / scale).item() <= tol, f"{what}: {(a - b).abs().max().item()} (scale {scale})"


@pytest.mark.parametrize("name", ALL_NETWORKS)
def test_fuse_every_registered_network(name):
    """In float64, so that 50 blocks of float32 rounding do not hide a wrong fold: agreement to 1e-9."""
    torch.manual_seed(0)
    plain = create_model(name, attention="cbam", num_classes=7).double()
    _randomise_norms(plain)
    fused = copy.deepcopy(plain)
    changed = cbam.fuse(fused)
    assert changed == _expected_paths(plain) and changed, changed
    assert all(isinstance(fused.get_submodule(p), FusedBlock) for p in changed)
    plain_sd, fused_sd = plain.state_dict(), fused.state_dict()
    assert list(plain_sd) == list(fused_sd)
    assert all(plain_sd[k].shape == fused_sd[k].shape for k in plain_sd)

    size = 32 if model_meta(name)["input_size"] == 224 else 8  # small maps: 50 blocks in float64 stay quick
    # batch 4: a BatchNorm over a 1 x 1 map of 2 samples is ill-conditioned (its gradient ~ 1 / |x1 - x2|)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    dout = torch.randn(4, 7, dtype=torch.float64)
    out_fused = fused(x)
    with reference_only():
        out_plain = plain(x)
    _close(out_fused, out_plain, 1e-9, "training output")
    (out_fused * dout).sum().backward()
    with reference_only():
        (out_plain * dout).sum().backward()
    grads_plain = dict(plain.named_parameters())
    for key, p in fused.named_parameters():
        _close(p.grad, grads_plain[key].grad, 1e-6, f"grad of {key}")
    fused_sd = fused.state_dict()
    for key, value in plain.state_dict().items():  # running statistics updated once, alike
        _close(fused_sd[key].double(), value.double(), 1e-9, key)

    fused.eval()
    plain.eval()
    with torch.no_grad():
        out_fused = fused(x)
        with reference_only():
            out_plain = plain(x)
    _close(out_fused, out_plain, 1e-9, "inference output")

    assert cbam.unfuse(fused) == changed
    assert not any(isinstance(m, FusedBlock) for m in fused.modules())
    assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]


@pytest.mark.parametrize("attention", [None, "se", "bam"])
def test_networks_without_cbam_are_left_alone(attention):
    model = create_model("resnet18", attention=attention, num_classes=3)
    assert cbam.fuse(model) == []
    assert cbam.fuse(model, memory_efficient=True) == []


def test_configurations_the_kernels_do_not_compute_are_left_alone_unless_memory_efficient():
    model = create_model("cifar_resnet20", attention="cbam", pool_types=("lp",), num_classes=3)
    assert cbam.fuse(model) == []
    assert len(cbam.fuse(model, memory_efficient=True)) == 9


def test_fuse_is_idempotent_and_updates_memory_efficient():
    model = create_model("cifar_resnet20", attention="cbam", num_classes=3)
    changed = cbam.fuse(model)
    assert len(changed) == 9
    assert cbam.fuse(model) == []
    assert cbam.fuse(model, memory_efficient=True) == changed
    assert all(model.get_submodule(p).memory_efficient for p in changed)
    assert cbam.unfuse(model) == changed
    assert cbam.unfuse(model) == []


def test_checkpoints_move_between_fused_and_unfused_models():
    a = create_model("resnet18", attention="cbam", num_classes=3)
    b = create_model("resnet18", attention="cbam", num_classes=3)
    cbam.fuse(b)
    b.load_state_dict(a.state_dict(), strict=True)
    a.load_state_dict(b.state_dict(), strict=True)
    a.eval()
    b.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "where",
    ["layer1.0.bn3", "layer1.0.attn", "layer1.0.attn.spatial.conv", "layer1.0.conv3", "layer1.0.downsample.1"],
)
def test_hooks_inside_a_fused_block_see_what_they_saw(where):
    torch.manual_seed(0)
    plain = create_model("resnet50", attention="cbam", num_classes=3).eval()
    _randomise_norms(plain)
    fused = copy.deepcopy(plain)
    cbam.fuse(fused)
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "fused": []}
    for key, model in (("plain", plain), ("fused", fused)):
        model.get_submodule(where).register_forward_hook(lambda m, i, o, key=key: seen[key].append(o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out_fused = fused(x)
        out_plain = plain(x)
    assert len(seen["fused"]) == len(seen["plain"]) == 1
    torch.testing.assert_close(seen["fused"][0], seen["plain"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-4, atol=1e-5)


def test_a_hook_kept_output_is_not_overwritten_in_place():
    """At inference the fused block writes its output over its last convolution's output, but not while a hook could
    have kept that tensor."""
    model = create_model("resnet18", attention="cbam", num_classes=3).eval()
    cbam.fuse(model)
    kept = []
    model.layer1[0].conv2.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    tensor, copy_at_call = kept[0]
    assert torch.equal(tensor, copy_at_call)


def test_backward_hooks_inside_a_fused_block_fire():
    model = create_model("cifar_resnet20", attention="cbam", num_classes=3)
    cbam.fuse(model)
    calls = []
    model.layer1[0].bn2.register_full_backward_hook(lambda m, gi, go: calls.append(go[0].shape))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [torch.Size([2, 16, 32, 32])]


def test_register_fusion_checks_its_arguments():
    class NotFused(BasicBlock):
        pass

    with pytest.raises(TypeError, match="must subclass FusedBlock"):
        register_fusion(BasicBlock, NotFused)

    class WithInit(FusedBlock, BasicBlock):
        def __init__(self):
            pass

    with pytest.raises(TypeError, match="must not define __init__"):
        register_fusion(WithInit.__mro__[2], WithInit)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_fusion(int)(WithInit)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        cbam.fuse("resnet50")  # type: ignore[arg-type]


def test_a_registered_fusion_applies_to_a_users_block():
    class MyBlock(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(channels)
            self.attn = cbam.CBAM(channels)

        def forward(self, x):
            return torch.relu(self.attn(self.bn(self.conv(x))) + x)

    @register_fusion(MyBlock)
    class FusedMyBlock(FusedBlock, MyBlock):
        def forward(self, x):
            if self.observed():
                return super().forward(x)
            return self.residual_tail(self.bn, self.attn, self.conv(x), x)

    model = nn.Sequential(MyBlock(32), MyBlock(32))
    reference = copy.deepcopy(model)
    assert cbam.fuse(model) == ["0", "1"]
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    with reference_only():
        expected = reference(x)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# SyncBatchNorm
# ----------------------------------------------------------------------------------------------------------------------
def _sync_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(x)
    out.square().mean().backward()
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_sync_batchnorm_converted_network_trains_and_evaluates(fused):
    torch.manual_seed(0)
    model = create_model("resnet18_cifar", attention="cbam", num_classes=5)
    reference = copy.deepcopy(model)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model.layer1[0].attn.spatial.norm, nn.SyncBatchNorm)
    assert cbam.fused.supported(model.layer1[0].attn) is not None  # the spatial gate then runs the reference path
    if fused:
        cbam.fuse(model, memory_efficient=False)
    x = torch.randn(4, 3, 32, 32)
    out = _sync_step(model, x)
    with reference_only():
        expected = _sync_step(reference, x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_sync_batchnorm_modules_run_on_their_own(monkeypatch):
    """Neither the kernels nor a fused block fold a SyncBatchNorm: every one of them is called in a training step.
    (Under a process group SyncBatchNorm itself takes CUDA inputs only; on the CPU it is a BatchNorm.)"""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(create_model("cifar_resnet20", attention="cbam"))
    cbam.fuse(model)
    calls = []
    forward = nn.SyncBatchNorm.forward
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", lambda self, x: calls.append(self) or forward(self, x))
    _sync_step(model, torch.randn(2, 3, 32, 32))
    norms = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(norms) == 19 + 9 and {id(m) for m in calls} == {id(m) for m in norms}
