"""``cbam.insert`` into torchvision's and timm's networks and the package's own: where the modules go, that identity
initialisation keeps the outputs exactly, parameter counts, stages, refusals, the original weights, a custom block."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import cbam
from cbam.insertion import attention_sites, block_stages, supported_blocks
from cbam.models import create_model

# builder -> (blocks that get attention, stages as stages= counts them: containers, or resolutions when flat)
TORCHVISION = {
    "resnet18": (8, 4),
    "resnet50": (16, 4),
    "resnext50_32x4d": (16, 4),
    "wide_resnet50_2": (16, 4),
    "mobilenet_v2": (17, 5),
    "mobilenet_v3_small": (11, 4),
    "efficientnet_b0": (16, 7),
    "regnet_y_400mf": (16, 4),
    "convnext_tiny": (18, 4),
}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norms away from their start (a wrongly scaled norm must show) and layer scales away from 1e-6."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, torchvision.models.convnext.CNBlock):
                m.layer_scale.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("name", "attention"), [(n, "cbam") for n in TORCHVISION] + [(n, "se") for n in ("resnet18", "mobilenet_v2")]
)
def test_torchvision_identity_params_and_refusal(name: str, attention: str, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _randomise(getattr(torchvision.models, name)(num_classes=10))
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(images)
    params = _count(model)
    paths = cbam.insert(model, attention)
    assert len(paths) == TORCHVISION[name][0]
    inserted = [model.get_submodule(p) for p in paths]
    assert all(type(m) is cbam.get_attn(attention) for m in inserted)
    assert _count(model) - params == sum(_count(m) for m in inserted)
    # the original keys are untouched except the scaled norms; the new keys are exactly the modules' keys
    after = model.state_dict()
    new_keys = {f"{p}.{k}" for p, m in zip(paths, inserted, strict=True) for k in m.state_dict()}
    assert set(after) - set(before) == new_keys
    assert set(before) <= set(after)
    with torch.no_grad():
        out = model(images)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)  # exact: powers of two (the issue asks for < 1e-5)
    with pytest.raises(ValueError, match=r"already holds .* insert into a network once"):
        cbam.insert(model, attention)
    assert max(block_stages(model).values()) == TORCHVISION[name][1]


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_identity_is_bit_exact_in_train_mode_too(name: str, images: torch.Tensor) -> None:
    """Batch statistics do not depend on the affine step, and the random draws (dropout, stochastic depth) come in the
    same order, so with the same seed the training-mode outputs are equal too."""
    torch.manual_seed(0)
    model = _randomise(getattr(torchvision.models, name)(num_classes=10))
    twin = copy.deepcopy(model)
    cbam.insert(model)
    model.train()
    twin.train()
    torch.manual_seed(1)
    out = model(images)
    torch.manual_seed(1)
    assert torch.equal(out, twin(images))


def test_identity_is_exact_and_the_attention_still_learns(images: torch.Tensor) -> None:
    """Powers of two: the outputs are bit-for-bit the original's, in eval and in train mode; the zeroed layers get a
    gradient, so fine-tuning moves the gates."""
    torch.manual_seed(0)
    model = _randomise(torchvision.models.resnet18(num_classes=10))
    twin = copy.deepcopy(model)
    cbam.insert(model)
    with torch.no_grad():
        assert torch.equal(model(images), twin(images))
    model.train()
    twin.train()
    assert torch.equal(model(images), twin(images))
    model(images).logsumexp(1).sum().backward()
    block = model.layer2[0]
    assert block.attn.channel.fc2.weight.grad.abs().sum() > 0
    assert block.attn.spatial.norm.weight.grad.abs().sum() > 0
    assert torch.equal(block.attn.channel.fc2.weight, torch.zeros_like(block.attn.channel.fc2.weight))


def test_identity_formula_scales_the_norm_by_four() -> None:
    model = _randomise(torchvision.models.resnet18(num_classes=10))
    weight = model.layer1[0].bn2.weight.detach().clone()
    bias = model.layer1[0].bn2.bias.detach().clone()
    cbam.insert(model)
    assert torch.equal(model.layer1[0].bn2.weight, weight * 4)
    assert torch.equal(model.layer1[0].bn2.bias, bias * 4)
    cbam.insert(se_model := _randomise(torchvision.models.resnet18(num_classes=10)), "se")
    assert torch.equal(se_model.layer1[0].bn2.weight, weight * 2)


def test_paper_init_changes_the_outputs_and_starts_the_spatial_gate_at_one_half(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _randomise(torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():
        expected = model(images)
    cbam.insert(model, init="paper")
    with torch.no_grad():
        out = model(images)
    assert (out - expected).abs().max() > 1e-3
    attn = model.layer1[0].attn
    assert torch.equal(attn.spatial.norm.weight, torch.zeros(1))
    assert attn.channel.fc2.weight.abs().sum() > 0


def test_timm_resnet_fills_its_se_slot(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _randomise(timm.create_model("resnet26", num_classes=10))
    with torch.no_grad():
        expected = model(images)
    params = _count(model)
    paths = cbam.insert(model, reduction=8)
    assert paths[:2] == ["layer1.0.se", "layer1.1.se"] and len(paths) == 8
    assert model.layer1[0].se.channel.hidden == 256 // 8
    assert _count(model) - params == sum(_count(model.get_submodule(p)) for p in paths)
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    other = timm.create_model("resnet26", num_classes=10)
    assert cbam.insert(other, stages=[4]) == ["layer4.0.se", "layer4.1.se"]
    built = timm.create_model("resnet26", num_classes=10, block_args=dict(attn_layer="se"))
    with pytest.raises(ValueError, match=r"layer1\.0\.se already holds SEModule"):
        cbam.insert(built)


def test_package_network_without_attention_gets_the_same_keys_as_one_built_with_it(images: torch.Tensor) -> None:
    plain = _randomise(create_model("resnet18", num_classes=10))
    with torch.no_grad():
        expected = plain(images)
    paths = cbam.insert(plain)
    with torch.no_grad():
        assert torch.equal(plain(images), expected)
    built = create_model("resnet18", attention="cbam", num_classes=10)
    assert set(plain.state_dict()) == set(built.state_dict())
    assert paths == [p for p, m in built.named_modules() if isinstance(m, cbam.CBAM)]
    with pytest.raises(ValueError, match="already holds CBAM"):
        cbam.insert(built)


def test_mobilenet_v1_of_the_package_gets_both_sites_per_block(images: torch.Tensor) -> None:
    plain = _randomise(create_model("mobilenet_v1", num_classes=10))
    with torch.no_grad():
        expected = plain(images)
    paths = cbam.insert(plain)
    assert len(paths) == 1 + 2 * 13  # the stem and both convolutions of each of the 13 blocks, as the paper's counts
    with torch.no_grad():
        assert torch.equal(plain(images), expected)
    assert sorted(set(block_stages(plain).values())) == [1, 2, 3, 4, 5]  # strides 2 (the stem and block 0) to 32


def test_stages_by_number_and_by_switches(images: torch.Tensor) -> None:
    model = torchvision.models.resnet50(num_classes=10)
    paths = cbam.insert(model, stages=(3, 4))
    assert paths and all(p.startswith(("layer3.", "layer4.")) for p in paths)
    assert len(paths) == 6 + 3
    model = torchvision.models.resnet18(num_classes=10)
    assert cbam.insert(model, stages=(False, True, False, True)) == ["layer2.0.attn", "layer2.1.attn",
                                                                      "layer4.0.attn", "layer4.1.attn"]
    model = torchvision.models.convnext_tiny(num_classes=10)
    assert all(p.startswith("features.7.") for p in cbam.insert(model, stages=[4]))
    with pytest.raises(ValueError, match=r"no stage 5; ResNet has stages \[1, 2, 3, 4\]"):
        cbam.insert(torchvision.models.resnet18(), stages=[5])
    for bad in ([], [0], ["layer3"], [1.5]):
        with pytest.raises(ValueError, match="stages must be stage numbers from 1"):
            cbam.insert(torchvision.models.resnet18(), stages=bad)
    with pytest.raises(TypeError, match="stages must be a sequence of stage numbers or of True/False, got 3"):
        cbam.insert(torchvision.models.resnet18(), stages=3)
    with pytest.raises(ValueError, match=r"stages=\(False, False, False, False\) selects no stage"):
        cbam.insert(torchvision.models.resnet18(), stages=(False,) * 4)


def test_stages_of_a_dilated_backbone_are_its_layers() -> None:
    """FCN / DeepLab keep layer2-layer4 at stride 8 (dilation): stages are the containers, not the resolutions."""
    segmenter = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    paths = cbam.insert(segmenter.backbone, stages=(3, 4))
    assert len(paths) == 6 + 3 and all(p.startswith(("layer3.", "layer4.")) for p in paths)


def test_efficientnet_v2_identity_refused_where_an_activation_precedes_the_slot() -> None:
    model = torchvision.models.efficientnet_v2_s(num_classes=10)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"features\.1\.0's output: an activation sits in front of the slot"):
        cbam.insert(model)
    assert not any(isinstance(m, cbam.CBAM) for m in model.modules())  # nothing changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    other = copy.deepcopy(model)
    _randomise(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert len(cbam.insert(model, stages=range(2, 7))) == 38  # the first stage left out: identity elsewhere
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert len(cbam.insert(other, init="paper")) == 40


def test_unknown_networks_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"VGG has no block type insert knows; supported: .*torchvision.models.resnet"
                                         r".Bottleneck.*register yours with cbam.register_placement"):
        cbam.insert(torchvision.models.vgg11())
    assert "timm.models.resnet.Bottleneck" in supported_blocks()
    with pytest.raises(TypeError, match="insert: expected an nn.Module, got str"):
        cbam.insert("resnet50")
    with pytest.raises(ValueError, match="init must be one of identity, paper, got 'zero'"):
        cbam.insert(torchvision.models.resnet18(), init="zero")
    with pytest.raises(ValueError, match="BAM sits between stages"):
        cbam.insert(torchvision.models.resnet18(), "bam")
    with pytest.raises(ValueError, match="unknown attention 'eca'"):
        cbam.insert(torchvision.models.resnet18(), "eca")
    with pytest.raises(TypeError, match="unexpected keyword argument 'reduce'"):
        cbam.insert(torchvision.models.resnet18(), reduce=8)


def test_custom_attention_class() -> None:
    class Gate(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(channels, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    with pytest.raises(TypeError, match="init='identity' needs an attention module that can start as a constant gate"):
        cbam.insert(torchvision.models.resnet18(), Gate)
    model = torchvision.models.resnet18()
    assert len(cbam.insert(model, Gate, init="paper")) == 8
    assert isinstance(model.layer1[0].attn, Gate)


class TinyBlock(nn.Module):
    """A user's residual block whose forward knows nothing about attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)) + x)


class TinyBlockWithAttention(TinyBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.attn(self.norm(self.conv(x))) + x)


def test_register_placement_for_ones_own_block() -> None:
    cbam.register_placement(TinyBlock, cbam.Placement("attn", "norm"), attended=TinyBlockWithAttention)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), TinyBlock(32), TinyBlock(32))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    keys = set(net.state_dict())
    assert cbam.insert(net, reduction=4) == ["1.attn", "2.attn"]
    assert type(net[1]) is TinyBlockWithAttention
    assert keys < set(net.state_dict())
    with torch.no_grad():
        assert (net(x) - expected).abs().max() < 1e-6
    with pytest.raises(TypeError, match="must subclass Conv2d and define no __init__"):
        cbam.register_placement(nn.Conv2d, cbam.Placement("attn", "norm"), attended=TinyBlockWithAttention)
    with pytest.raises(TypeError, match="expected one or more Placement"):
        cbam.register_placement(TinyBlock)


def test_load_base_weights_reports_only_the_new_keys_and_keeps_identity(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    source = _randomise(torchvision.models.resnet50(num_classes=10))
    with torch.no_grad():
        expected = source(images)
    fresh = torchvision.models.resnet50(num_classes=10)
    paths = cbam.insert(fresh)
    missing = cbam.load_base_weights(fresh, source.state_dict())
    assert missing and all(any(k.startswith(p + ".") for p in paths) for k in missing)
    assert len(missing) == len(paths) * (len(cbam.CBAM(64).state_dict()) - 1)  # BatchNorm fills num_batches_tracked
    # the documented one-liner: strict=False reports exactly these keys and nothing unexpected
    other = torchvision.models.resnet50(num_classes=10)
    cbam.insert(other)
    result = other.load_state_dict(source.state_dict(), strict=False)
    assert sorted(result.missing_keys) == missing and result.unexpected_keys == []
    with torch.no_grad():
        assert (fresh.eval()(images) - expected).abs().max() < 1e-5
    # the package's own network built with CBAM takes torchvision's weights the same way
    ours = create_model("resnet50", attention="cbam", num_classes=10)
    assert set(cbam.load_base_weights(ours, source.state_dict())) == set(missing)
    with torch.no_grad():
        assert (ours.eval()(images) - expected).abs().max() < 1e-5


def test_load_base_weights_refuses_what_does_not_fit() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    cbam.insert(model)
    before = copy.deepcopy(model.state_dict())
    wrong_classes = torchvision.models.resnet18(num_classes=5).state_dict()
    with pytest.raises(ValueError, match=r"fc.weight has shape \[5, 512\], the model expects \[10, 512\]"):
        cbam.load_base_weights(model, wrong_classes)
    with pytest.raises(ValueError, match=r"do not fit ResNet: missing conv1.weight"):
        cbam.load_base_weights(model, {k: v for k, v in wrong_classes.items() if k != "conv1.weight"})
    with pytest.raises(ValueError, match=r"unexpected extra.weight"):
        cbam.load_base_weights(model, {**torchvision.models.resnet18(num_classes=10).state_dict(),
                                       "extra.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="expected a state dict"):
        cbam.load_base_weights(model, [1, 2])
    with pytest.raises(TypeError, match="expected tensors, fc.bias is list"):
        cbam.load_base_weights(model, {**torchvision.models.resnet18(num_classes=10).state_dict(), "fc.bias": [0.0]})
    with pytest.raises(ValueError, match=r"already hold attention weights \(layer1.0.attn.channel.fc1.bias, ...\)"):
        cbam.load_base_weights(model, model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_sites_follow_the_module_order() -> None:
    model = torchvision.models.resnet18()
    sites = attention_sites(model)
    assert [s.slot_path for s in sites] == [f"layer{s}.{b}.attn" for s in range(1, 5) for b in range(2)]


def test_inserted_modules_follow_the_blocks_mode_device_and_dtype() -> None:
    model = torchvision.models.resnet18().double().train()
    cbam.insert(model)
    attn = model.layer1[0].attn
    assert attn.training and attn.channel.fc1.weight.dtype == torch.float64
    model.eval()
    assert not attn.training


def test_frozen_batchnorm_backbone_of_a_pretrained_detector(images: torch.Tensor) -> None:
    """torchvision builds detection backbones with FrozenBatchNorm2d when pretrained weights are asked for: its scale
    and shift are buffers, scaled the same way."""
    body = torchvision.models.resnet50(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
        expected = body.eval()(images)
    assert len(cbam.insert(body)) == 16
    assert body.layer1[0].attn.channels == 256
    with torch.no_grad():
        assert torch.equal(body(images), expected)
