"""docs/detection-segmentation.md runs as written; the detection and segmentation adapters fit torchvision's models."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.segmentation import FCN
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from cbam import CBAM, create_model
from cbam.models.detection import FPNBackbone, SegmentationBackbone

DOC = Path(__file__).resolve().parents[2] / "docs" / "detection-segmentation.md"


pytestmark = pytest.mark.usefixtures("single_thread")  # see tests/conftest.py


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def _grads_reached(modules: list[nn.Module]) -> bool:
    """Every module has a parameter with a non-zero gradient."""
    return all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for m in modules)


def test_the_docs_examples_run_in_order_and_train():
    blocks = python_blocks()
    assert len(blocks) == 6, f"expected the 6 examples of {DOC.name}, found {len(blocks)}"
    namespace: dict = {"__name__": "docs_example"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
        if number == 3:  # Faster R-CNN on a CBAM ResNet-50 from create_model
            detector = namespace["detector"]
            assert isinstance(detector.backbone, FPNBackbone) and detector.backbone.out_channels == 256
            body = detector.backbone.body
            assert body.feature_info.channels() == [256, 512, 1024, 2048]
            cbams = [m for m in body.modules() if isinstance(m, CBAM)]
            assert len(cbams) == 16 and _grads_reached(cbams)
            expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
            assert set(namespace["losses"]) == expected
            detections = namespace["detections"]
            assert len(detections) == 2
            for d in detections:
                assert d["boxes"].ndim == 2 and d["boxes"].shape[1] == 4 and len(d["labels"]) == len(d["scores"])
                assert bool(((d["boxes"] >= 0) & (d["boxes"] <= 128)).all())
        if number == 4:  # torchvision's Faster R-CNN after cbam.insert: the new modules learn
            body = namespace["detector"].backbone.body
            assert _grads_reached([body.get_submodule(path) for path in namespace["added"]])
        if number == 5:  # DeepLabV3 on a CBAM backbone
            segmenter = namespace["segmenter"]
            assert segmenter.backbone.out_channels == 2048 and segmenter.backbone.aux_channels == 1024
            assert tuple(namespace["predicted"].shape) == (2, 128, 128)
            cbams = [m for m in segmenter.backbone.modules() if isinstance(m, CBAM)]
            assert len(cbams) == 16 and _grads_reached(cbams)
    segmenter = namespace["segmenter"]  # torchvision's FCN after cbam.insert
    assert _grads_reached([segmenter.backbone.get_submodule(path) for path in namespace["added"]])
    masks = namespace["masks"]
    assert tuple(masks.shape) == (2, 128, 128) and set(masks.unique().tolist()) == {0, 1, 2}


def test_fpn_backbone_equals_torchvisions_backbone_with_fpn():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    theirs = BackboneWithFPN(reference, layers, [64, 128, 256, 512], 32).eval()
    ours = FPNBackbone(create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4)), 32).eval()
    assert ours.out_channels == theirs.out_channels == 32
    ours.load_state_dict(theirs.state_dict())  # strict: the keys are torchvision's (body.*, fpn.*)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert isinstance(a, OrderedDict) and list(a) == list(b) == ["0", "1", "2", "3", "pool"]
    assert [tuple(t.shape) for t in a.values()] == [(1, 32, s, s) for s in (16, 8, 4, 2, 1)]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_fpn_backbone_on_mobilenet_in_retinanet():
    torch.manual_seed(0)
    body = create_model("mobilenet_v1", attention="cbam", width_mult=0.25, features_only=True, out_indices=(2, 3, 4))
    backbone = FPNBackbone(body, 32, extra_blocks=LastLevelP6P7(32, 32))
    detector = RetinaNet(backbone, num_classes=3, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = detector(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    cbams = [m for m in body.modules() if isinstance(m, CBAM)]
    assert cbams and _grads_reached(cbams)
    with torch.no_grad():
        maps = backbone.eval()(images[0][None])
    assert list(maps) == ["0", "1", "2", "p6", "p7"]
    assert [t.shape[-1] for t in maps.values()] == [8, 4, 2, 1, 1]


def test_faster_rcnn_inference_on_a_small_backbone_gives_boxes_in_the_image():
    torch.manual_seed(0)
    body = create_model("resnet18", attention="cbam", features_only=True, out_indices=(1, 2, 3, 4))
    detector = FasterRCNN(FPNBackbone(body, 64), num_classes=2, min_size=64, max_size=64, box_score_thresh=0.0).eval()
    with torch.no_grad():
        (out,) = detector([torch.rand(3, 48, 80)])  # any size: torchvision resizes and maps the boxes back
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) > 0
    assert bool((out["boxes"][:, 2] <= 80).all() and (out["boxes"][:, 3] <= 48).all())
    assert set(out["labels"].tolist()) <= {1}


def test_segmentation_backbone_with_one_map_and_fcn():
    torch.manual_seed(0)
    backbone = SegmentationBackbone(create_model("resnet18", attention="cbam", features_only=True, out_indices=(4,)))
    assert backbone.out_channels == 512 and backbone.aux_channels is None
    segmenter = FCN(backbone, FCNHead(backbone.out_channels, 4)).eval()
    with torch.no_grad():
        out = segmenter(torch.rand(1, 3, 64, 96))
    assert list(out) == ["out"] and tuple(out["out"].shape) == (1, 4, 64, 96)
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 64))
    assert list(features) == ["out"] and tuple(features["out"].shape) == (1, 512, 2, 2)


def test_segmentation_backbone_with_two_maps_returns_aux_first():
    backbone = SegmentationBackbone(create_model("cifar_resnet20", features_only=True, out_indices=(2, 3))).eval()
    assert (backbone.aux_channels, backbone.out_channels) == (32, 64)
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 32, 32))
    assert list(features) == ["aux", "out"]
    assert tuple(features["aux"].shape) == (1, 32, 16, 16) and tuple(features["out"].shape) == (1, 64, 8, 8)


def test_adapter_errors_are_one_line():
    classifier = create_model("resnet18")
    for build in (FPNBackbone, SegmentationBackbone):
        with pytest.raises(TypeError, match="features_only=True") as info:
            build(classifier)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="one feature map .* or two") as info:
        SegmentationBackbone(create_model("resnet18", features_only=True, out_indices=(2, 3, 4)))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        FPNBackbone(create_model("resnet18", features_only=True), 0)
