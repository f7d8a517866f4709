"""Backbones for torchvision's detection and segmentation models, built on a :class:`~cbam.models.features.FeatureNet`.

torchvision's models each expect a particular backbone interface, and these adapters give a CBAM network that
interface without re-implementing any head, so torchvision's training recipes and losses apply unchanged:

* :class:`FPNBackbone` for ``FasterRCNN`` / ``MaskRCNN`` / ``KeypointRCNN`` / ``RetinaNet``: torchvision's
  ``FeaturePyramidNetwork`` (with ``LastLevelMaxPool`` by default) over the selected maps; ``forward`` returns an
  ``OrderedDict`` keyed ``"0"``, ``"1"``, ... (and ``"pool"``), and ``out_channels`` says the pyramid's width, as
  torchvision's ``BackboneWithFPN``. With ``out_indices=(1, 2, 3, 4)`` the five maps fit torchvision's default anchor
  generator and RoI pooling.
* :class:`SegmentationBackbone` for ``DeepLabV3`` / ``FCN``: ``forward`` returns ``{"out": deepest map}`` and, when two
  maps are selected, ``"aux"`` the shallower one for the auxiliary head, as torchvision's ``IntermediateLayerGetter``.

The maps stay at the classifier's strides (no dilated stages): a segmentation head sees stride 32 and torchvision's
models upsample its logits to the input size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .features import FeatureNet

__all__ = ["FPNBackbone", "SegmentationBackbone"]


def _check_features(features: object, who: str) -> FeatureNet:
    if not isinstance(features, FeatureNet):
        raise TypeError(
            f"{who}: expected a feature network from cbam.create_model(..., features_only=True) or "
            f"cbam.models.features.features_only(model), got {type(features).__name__}"
        )
    return features


class FPNBackbone(nn.Module):
    """Feature maps plus a feature pyramid: the ``backbone`` of torchvision's two-stage and one-stage detectors.

    Args:
        features: a :class:`FeatureNet` (``body``); its ``in_channels_list`` sizes the pyramid.
        out_channels: channels of every pyramid level (torchvision's default 256).
        extra_blocks: torchvision's extra levels; ``None`` adds ``LastLevelMaxPool`` (the ``"pool"`` level).
        norm_layer: optional normalisation inside the pyramid (torchvision's ``norm_layer``).
    """

    def __init__(
        self,
        features: FeatureNet,
        out_channels: int = 256,
        *,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.body = _check_features(features, "FPNBackbone")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels <= 0:
            raise ValueError(f"FPNBackbone: out_channels must be a positive int, got {out_channels!r}")
        self.fpn = FeaturePyramidNetwork(
            features.in_channels_list,
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class SegmentationBackbone(nn.Module):
    """The ``backbone`` of torchvision's ``DeepLabV3`` and ``FCN``: ``{"out": ...}`` (and ``"aux"``).

    ``features`` must select one map (the head's input) or two (the shallower one feeds ``aux_classifier``), e.g.
    ``out_indices=(4,)`` or ``(3, 4)``. ``out_channels`` and ``aux_channels`` (``None`` without one) size the heads.
    """

    def __init__(self, features: FeatureNet) -> None:
        super().__init__()
        self.body = _check_features(features, "SegmentationBackbone")
        channels = features.in_channels_list
        if len(channels) not in (1, 2):
            raise ValueError(
                f"SegmentationBackbone: select one feature map (out) or two (aux, out), got out_indices "
                f"{features.out_indices}"
            )
        self.out_channels = channels[-1]
        self.aux_channels = channels[0] if len(channels) == 2 else None

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        result: OrderedDict[str, torch.Tensor] = OrderedDict()
        if len(maps) == 2:
            result["aux"] = maps[0]
        result["out"] = maps[-1]
        return result
