"""features_only: the feature maps, their channels and strides, the classifier's weights, timm's conventions, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cbam
from cbam.models import create_model
from cbam.models.features import FeatureInfo, FeatureNet, features_only, supported_networks
from cbam.train.checkpoint import save_weights


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode maps are not all alike."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# name, builder kwargs, input size, expected channels and strides of all maps
CASES = {
    "resnet18-cbam": ("resnet18", {"attention": "cbam"}, 64, [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
    "resnet50-bam": ("resnet50", {"attention": "bam"}, 64, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    "wide_resnet18-se": ("wide_resnet18", {"attention": "se"}, 64, [64, 96, 192, 384, 768], [2, 4, 8, 16, 32]),
    "resnet18_cifar": ("resnet18_cifar", {}, 32, [64, 64, 128, 256, 512], [1, 1, 2, 4, 8]),
    "cifar_resnet20-bam": ("cifar_resnet20", {"attention": "bam"}, 32, [16, 16, 32, 64], [1, 1, 2, 4]),
    "mobilenet_v1-cbam": ("mobilenet_v1", {"attention": "cbam", "width_mult": 0.25}, 64,
                          [16, 32, 64, 128, 256], [2, 4, 8, 16, 32]),
    "mobilenet_v1-bam": ("mobilenet_v1", {"attention": "bam", "width_mult": 0.25}, 64,
                         [16, 32, 64, 128, 256], [2, 4, 8, 16, 32]),
}


def _build(case: str) -> tuple[nn.Module, int, list[int], list[int]]:
    name, kwargs, size, channels, strides = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **kwargs).eval()
    _randomise_batchnorm(model)
    return model, size, channels, strides


def _activations(model: nn.Module, modules: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the named modules of the classifier output during its own forward pass."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o.clone()))
        for name in modules
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_all_maps_have_the_stated_channels_strides_and_equal_the_classifiers_activations(case):
    model, size, channels, strides = _build(case)
    features = features_only(model)
    assert features.out_indices == tuple(range(len(channels)))
    assert features.feature_info.channels() == channels == features.in_channels_list
    assert features.feature_info.reduction() == strides
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = features(x)
    assert isinstance(maps, list) and len(maps) == len(channels)
    for m, c, s in zip(maps, channels, strides, strict=True):
        assert tuple(m.shape) == (2, c, size // s, size // s)
    names = features.feature_info.module_name()
    reference = _activations(model, names, x)
    for m, name in zip(maps, names, strict=True):
        torch.testing.assert_close(m, reference[name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(maps[-1], model.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("case", "out_indices", "expected"),
    [
        ("resnet50-bam", (1, 2, 3, 4), (1, 2, 3, 4)),
        ("resnet50-bam", (2,), (2,)),
        ("resnet18-cbam", (0, 3), (0, 3)),
        ("resnet18-cbam", [-2, -1], (3, 4)),
        ("mobilenet_v1-bam", (1, 3), (1, 3)),
        ("cifar_resnet20-bam", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_selected_maps(case, out_indices, expected):
    model, size, channels, strides = _build(case)
    features = features_only(model, out_indices)
    assert features.out_indices == expected
    assert features.feature_info.channels() == [channels[i] for i in expected]
    assert features.feature_info.reduction() == [strides[i] for i in expected]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        maps = features(x)
        every = features_only(model)(x)
    assert len(maps) == len(expected)
    for m, i in zip(maps, expected, strict=True):
        torch.testing.assert_close(m, every[i], rtol=0, atol=0)


def test_modules_are_shared_and_later_stages_and_the_head_are_left_out():
    model, *_ = _build("resnet50-bam")
    features = features_only(model, (1, 2))
    assert features.layer1 is model.layer1 and features.bam2 is model.bam2
    assert not hasattr(features, "layer3") and not hasattr(features, "bam3") and not hasattr(features, "fc")
    kept = set(features.state_dict())
    assert kept < set(model.state_dict())
    assert {k.split(".")[0] for k in kept} == {"conv1", "bn1", "layer1", "bam1", "layer2", "bam2"}
    whole = features_only(model)
    assert set(model.state_dict()) - set(whole.state_dict()) == {"fc.weight", "fc.bias"}
    assert list(whole.state_dict()) == [k for k in model.state_dict() if not k.startswith("fc.")]


def test_mobilenet_keeps_only_the_blocks_it_needs_under_their_names():
    model, *_ = _build("mobilenet_v1-cbam")
    features = features_only(model, (0, 2))
    assert len(features.blocks) == 5 and features.blocks[4] is model.blocks[4]
    assert features.feature_info.module_name() == ["blocks.0", "blocks.4"]
    assert set(features.state_dict()) < set(model.state_dict())


def test_bam_stage_outputs_are_taken_after_bam():
    model, *_ = _build("resnet50-bam")
    assert features_only(model).feature_info.module_name() == ["relu", "bam1", "bam2", "bam3", "layer4"]
    model, *_ = _build("mobilenet_v1-bam")
    assert features_only(model).feature_info.module_name() == ["bam1", "bam2", "bam3", "bam4", "blocks.12"]


def test_classifier_weights_load_with_the_documented_one_liner():
    classifier, size, *_ = _build("resnet18-cbam")
    torch.manual_seed(5)
    features = create_model("resnet18", attention="cbam", num_classes=5)
    features = features_only(features, (1, 2, 3)).eval()
    state = classifier.state_dict()
    features.load_state_dict({k: v for k, v in state.items() if k in features.state_dict()})
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(features(x), features_only(classifier, (1, 2, 3))(x), rtol=0, atol=0)


def test_create_model_loads_the_checkpoint_before_cutting(tmp_path):
    classifier, size, *_ = _build("resnet18-cbam")
    path = save_weights(tmp_path / "classifier.safetensors", classifier)
    features = cbam.create_model(
        "resnet18", attention="cbam", num_classes=5, checkpoint=path, features_only=True, out_indices=(2, 4)
    ).eval()
    assert isinstance(features, FeatureNet) and features.model_name == "resnet18" and features.attention == "cbam"
    x = torch.randn(1, 3, size, size)
    reference = _activations(classifier, ["layer2", "layer4"], x)
    with torch.no_grad():
        maps = features(x)
    torch.testing.assert_close(maps[0], reference["layer2"], rtol=0, atol=0)
    torch.testing.assert_close(maps[1], reference["layer4"], rtol=0, atol=0)


def test_training_mode_follows_the_classifier_and_gradients_reach_every_kept_parameter():
    model, size, *_ = _build("resnet18-cbam")
    assert not features_only(model).training
    features = features_only(model.train(), (1, 4))
    assert features.training
    maps = features(torch.randn(2, 3, size, size))
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None for p in features.parameters())


def test_torchvision_resnet_matches_timm_and_our_own():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    _randomise_batchnorm(reference)
    ours = features_only(create_model("resnet50").eval(), (1, 2, 3, 4))
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if k in ours.state_dict()})
    theirs = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    theirs.load_state_dict(ours.state_dict())  # same keys: a timm features checkpoint loads strictly
    tv = features_only(reference, (1, 2, 3, 4))
    assert ours.feature_info.channels() == theirs.feature_info.channels() == tv.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == tv.feature_info.reduction()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b, c in zip(ours(x), theirs(x), tv(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_mobilenet_maps_match_timms_mobilenetv1_layout():
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("mobilenetv1_100", pretrained=False, features_only=True)
    ours = features_only(create_model("mobilenet_v1"))
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()


def test_feature_info_accessors():
    info = FeatureInfo(
        [{"num_chs": 8, "reduction": 2, "module": "a"}, {"num_chs": 16, "reduction": 4, "module": "b"},
         {"num_chs": 32, "reduction": 8, "module": "c"}],
        (1, 2),
    )
    assert len(info) == 3 and info[0]["module"] == "a" and info[2]["index"] == 2
    assert info.channels() == [16, 32] and info.channels(0) == 8 and info.channels([0, 2]) == [8, 32]
    assert info.reduction() == [4, 8] and info.module_name() == ["b", "c"] and info.module_name(0) == "a"
    assert info.get_dicts(keys=["num_chs"]) == [{"num_chs": 16}, {"num_chs": 32}]
    assert [d["module"] for d in info] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("out_indices", "error", "words"),
    [
        (4, TypeError, "sequence of ints"),
        ("1234", TypeError, "sequence of ints"),
        ({1, 2}, TypeError, "sequence of ints"),
        ((1.0, 2), TypeError, "must be ints"),
        ((True,), TypeError, "must be ints"),
        ((), ValueError, "at least one"),
        ((1, 5), ValueError, "0-4, got 5"),
        ((-6,), ValueError, "0-4, got -6"),
        ((1, 1), ValueError, "twice"),
        ((4, -1), ValueError, "twice"),
        ((3, 1), ValueError, "increasing"),
    ],
)
def test_out_indices_errors(out_indices, error, words):
    model = create_model("resnet18")
    with pytest.raises(error, match=words) as info:
        features_only(model, out_indices)
    assert "\n" not in str(info.value)


def test_cifar_resnet_has_four_maps():
    with pytest.raises(ValueError, match="cifar_resnet20 has feature maps 0-3, got 4"):
        features_only(create_model("cifar_resnet20"), (4,))


@pytest.mark.parametrize("model", [nn.Linear(2, 2), torchvision.models.mobilenet_v2()], ids=["linear", "tv_mbv2"])
def test_unsupported_networks_name_the_supported_ones(model):
    with pytest.raises(TypeError, match="supported:") as info:
        features_only(model)
    message = str(info.value)
    assert "\n" not in message and all(label in message for label in supported_networks())
    with pytest.raises(TypeError, match="expected an nn.Module"):
        features_only("resnet18")  # type: ignore[arg-type]
