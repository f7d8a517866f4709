"""ResNet family: torchvision compatibility, attention placement, stride convention, the authors' counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from cbam import fuse
from cbam.layers import BAM, CBAM, SE, reference_only
from cbam.models import count_params, create_model, profile_model
from cbam.models.resnet import BasicBlock, Bottleneck


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give every BN non-trivial affine parameters and running statistics, so eval mode tests them too."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torchvision_state_dict_loads_strict_and_matches(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    _randomise_batchnorm(reference)
    ours = create_model(name).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_stride_in_1x1_changes_macs_not_params():
    v15 = profile_model("resnet50")
    v1 = profile_model("resnet50", stride_in_1x1=True)
    assert v1["params"] == v15["params"] == 25_557_032
    assert round(v15["macs"] / 1e9, 3) == 4.089
    assert round(v1["macs"] / 1e9, 3) == 3.858
    with torch.device("meta"):
        block = create_model("resnet50", stride_in_1x1=True).layer3[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    with torch.device("meta"):
        block = create_model("resnet50").layer3[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


@pytest.mark.parametrize(("attention", "cls"), [("cbam", CBAM), ("se", SE)])
def test_attention_in_every_block(attention, cls):
    with torch.device("meta"):
        model = create_model("resnet50", attention=attention)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    for b in blocks:
        assert isinstance(b.attn, cls) and b.attn.channels == b.bn3.num_features
    assert all(isinstance(getattr(model, f"bam{i}"), nn.Identity) for i in (1, 2, 3))


def test_no_attention_leaves_identity_without_keys():
    with torch.device("meta"):
        model = create_model("resnet18")
    assert isinstance(model.layer1[0].attn, nn.Identity)
    assert not any("attn" in k or "bam" in k for k in model.state_dict())


def test_bam_at_stage_ends_only():
    with torch.device("meta"):
        model = create_model("resnet50", attention="bam")
    assert [getattr(model, f"bam{i}").channels for i in (1, 2, 3)] == [256, 512, 1024]
    assert all(isinstance(getattr(model, f"bam{i}"), BAM) for i in (1, 2, 3))
    assert all(isinstance(b.attn, nn.Identity) for b in model.modules() if isinstance(b, Bottleneck))

    # bam1 runs on layer1's output and feeds layer2.
    model = create_model("resnet18", attention="bam", num_classes=10)
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.__setitem__("layer1", o.clone()))
    model.bam1.register_forward_hook(lambda m, i, o: seen.__setitem__("bam1_in", i[0].clone()))
    model.layer2.register_forward_pre_hook(lambda m, i: seen.__setitem__("layer2_in", i[0].clone()))
    model.bam1.register_forward_hook(lambda m, i, o: seen.__setitem__("bam1_out", o.clone()))
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(seen["bam1_in"], seen["layer1"])
    torch.testing.assert_close(seen["layer2_in"], seen["bam1_out"])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_attention_placement_in_the_block(name):
    """out = relu(attn(bn_last(...)) + shortcut): attention after the last BN, before the add and the ReLU."""
    torch.manual_seed(0)
    model = create_model(name, attention="cbam", num_classes=10).eval()
    block = model.layer2[0]  # has a downsample shortcut
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    seen = {}
    last_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", (i[0].clone(), o.clone())))
    block.downsample.register_forward_hook(lambda m, i, o: seen.__setitem__("shortcut", o.clone()))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    attn_in, attn_out = seen["attn"]
    torch.testing.assert_close(attn_in, seen["bn"])
    torch.testing.assert_close(seen["out"], torch.relu(attn_out + seen["shortcut"]))


def test_release_parameter_counts_and_key_count():
    """The authors' code builds ResNet-18/34/50/101 + CBAM with exactly these many parameters."""
    expected = {
        "resnet18": 11_779_392,
        "resnet34": 21_960_468,
        "resnet50": 28_089_624,
        "resnet101": 49_330_172,
    }
    for name, n in expected.items():
        with torch.device("meta"):
            model = create_model(name, attention="cbam")
        assert count_params(model) == n, name
        if name == "resnet50":
            sd = model.state_dict()
            assert len(sd) == 480  # as the release's ResNet-50 + CBAM checkpoint
            # per block: 10 CBAM entries (two MLP layers with biases, 7x7 conv, BN with 5 entries)
            cbam_keys = [k for k in sd if k.startswith("layer1.0.attn.")]
            assert len(cbam_keys) == 10
            assert sd["layer1.0.attn.channel.fc1.weight"].shape == (16, 256)
            assert sd["layer1.0.attn.spatial.conv.weight"].shape == (1, 2, 7, 7)


def test_widths():
    with torch.device("meta"):
        wide = create_model("wide_resnet18")
        wide2 = create_model("wide_resnet18", widen=2.0)
        resnext = create_model("resnext50_32x4d")
    assert wide.conv1.out_channels == 64  # the stem is not widened
    assert [getattr(wide, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] == [96, 192, 384, 768]
    assert wide2.fc.in_features == 1024
    conv = resnext.layer1[0].conv2
    assert conv.groups == 32 and conv.in_channels == 128  # int(64 * 4 / 64) * 32
    assert resnext.layer4[0].conv2.in_channels == 1024


def test_cifar_stem():
    with torch.device("meta"):
        model = create_model("resnet18_cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10
    out = create_model("resnet18_cifar", attention="cbam").eval()(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


def test_zero_init_residual_and_dropout():
    model = create_model("resnet18", zero_init_residual=True, drop_rate=0.2, num_classes=10)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in model.modules() if isinstance(b, BasicBlock))
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.2
    with pytest.raises(ValueError, match="BasicBlock supports only groups=1"):
        create_model("resnet18", groups=32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fused_network_gives_the_same_numbers(name):
    """cbam.fuse folds each block's last BatchNorm into CBAM's kernels and takes the shortcut's addition and the ReLU
    into them: the same outputs, gradients and running statistics as the unfused network on the reference path.
    Gradients are compared in float64: in float32 a deep network's BatchNorm backward amplifies the different rounding
    of the two paths to about 1e-4."""
    torch.manual_seed(0)
    reference = create_model(name, attention="cbam", num_classes=10).double()
    fused = copy.deepcopy(reference)
    assert len(fuse(fused)) == (8 if name == "resnet18" else 16)
    x = torch.randn(2, 3, 64, 64)
    out_a = fused(x.double())
    with reference_only():
        out_b = reference(x.double())
    torch.testing.assert_close(out_a, out_b)
    out_a.square().sum().backward()
    with reference_only():
        out_b.square().sum().backward()
    for (k, p), q in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=k)
    for (k, a), b in zip(fused.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)  # running statistics, num_batches_tracked
    fused, reference = fused.float().eval(), reference.float().eval()
    with torch.no_grad():
        out_a = fused(x)
        with reference_only():
            torch.testing.assert_close(out_a, reference(x))
