"""create_model / list_models / register_model: naming, keyword routing and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam.layers import CBAM, SE
from cbam.models import _registry, create_model, list_models, model_meta, register_model

EXPECTED = {
    "cifar_resnet20",
    "cifar_resnet56",
    "cifar_resnet110",
    "mobilenet_v1",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet18_cifar",
    "resnet34_cifar",
    "resnet50_cifar",
    "resnet101_cifar",
    "resnext50_32x4d",
    "resnext101_32x4d",
    "wide_resnet18",
}


def test_list_models_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert EXPECTED <= set(names)


def test_list_models_pattern():
    assert list_models("resnet*") == sorted(n for n in EXPECTED if n.startswith("resnet"))
    assert list_models("*_cifar") == ["resnet101_cifar", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar"]
    assert list_models("nothing*") == []


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet51'.*resnet50"):
        create_model("resnet51")
    with pytest.raises(ValueError, match=r"unknown model 'zzz'; available: cifar_resnet110"):
        create_model("zzz")


def test_attention_kwargs_without_attention_is_one_clear_error():
    with pytest.raises(ValueError, match=r"reduction is an attention option but attention is None") as info:
        create_model("resnet18", reduction=8)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"kernel_size, reduction are attention options but attention is None"):
        create_model("resnet18", reduction=8, kernel_size=3)


def test_unknown_keyword_names_both_option_sets():
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) bogus.*widen.*kernel_size"):
        create_model("resnet18", attention="cbam", bogus=1)
    with pytest.raises(ValueError, match="kernel_size"):  # SE has no spatial kernel
        create_model("resnet18", attention="se", kernel_size=3)
    for how in ("implementation", "memory_efficient", "fuse_residual"):  # how CBAM runs is no option of the network
        with pytest.raises(ValueError, match=rf"unknown keyword\(s\) {how}"):
            create_model("resnet18", attention="cbam", **{how: True})


def test_unknown_attention():
    with pytest.raises(ValueError, match="unknown attention 'cbma'"):
        create_model("resnet18", attention="cbma")


def test_kwargs_routing_reaches_every_attention_module():
    model = create_model("resnet18", attention="cbam", reduction=8, kernel_size=3, num_classes=10)
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert len(cbams) == 8  # one per basic block
    for m in cbams:
        assert m.channel.hidden == m.channels // 8
        assert m.spatial.kernel_size == 3
        assert m.spatial.conv.weight.shape[-1] == 3
    assert model.attn_kwargs == {"reduction": 8, "kernel_size": 3}


def test_model_kwargs_go_to_the_network():
    model = create_model("resnet50", attention="se", stride_in_1x1=True, reduction=32, num_classes=7)
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert isinstance(block.attn, SE) and block.attn.hidden == 512 // 32
    assert model.fc.out_features == 7
    assert model.model_kwargs == {"stride_in_1x1": True, "num_classes": 7}


def test_model_attributes():
    model = create_model("resnet18", attention=CBAM)
    assert model.model_name == "resnet18"
    assert model.attention == "cbam"
    assert create_model("resnet18", attention="None").attention == "none"


def test_num_classes_default_is_the_builders():
    with torch.device("meta"):
        assert create_model("resnet18").fc.out_features == 1000
        assert create_model("resnet18_cifar").fc.out_features == 10
        assert create_model("cifar_resnet20").fc.out_features == 10
        assert create_model("cifar_resnet20", num_classes=100).fc.out_features == 100
    assert model_meta("cifar_resnet20")["input_size"] == 32
    assert model_meta("resnet50")["input_size"] == 224


@pytest.mark.parametrize("name", ["resnet18", "resnet18_cifar", "cifar_resnet20", "mobilenet_v1"])
def test_in_chans_grey_input(name):
    model = create_model(name, attention="cbam", in_chans=1, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_register_model_bare_and_with_metadata():
    try:

        @register_model
        def _tiny_test_model(*, attention=None, num_classes=2, attn_kwargs=None, width=4):
            return nn.Sequential(nn.Conv2d(3, width, 1), nn.Flatten(), nn.LazyLinear(num_classes))

        @register_model(input_size=8, paper="none")
        def _tiny_test_model2(*, attention=None, num_classes=2, attn_kwargs=None):
            return nn.Identity()

        assert "_tiny_test_model" in list_models("_tiny*")
        model = create_model("_tiny_test_model", width=6)
        assert model[0].out_channels == 6 and model.model_name == "_tiny_test_model"
        assert model_meta("_tiny_test_model2") == {"input_size": 8, "paper": "none"}

        def _other():  # pragma: no cover - never built
            return nn.Identity()

        _other.__name__ = "_tiny_test_model"
        with pytest.raises(ValueError, match="already registered"):
            register_model(_other)  # a different builder under a taken name is refused
    finally:
        for key in ("_tiny_test_model", "_tiny_test_model2"):
            _registry._MODELS.pop(key, None)
            _registry._META.pop(key, None)
