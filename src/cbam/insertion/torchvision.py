"""torchvision's residual blocks with an attention slot, and where the slot goes in each.

Each ``Attended*`` type is the torchvision block plus one line in ``forward``: the attention module ``attn`` applied
to the residual branch after its last normalisation (ConvNeXt: after the layer scale), before the shortcut is added.
:func:`cbam.insert` swaps a block's class to it and sets ``attn``, so the block's own keys are untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.convnext import CNBlock
from torchvision.models.efficientnet import FusedMBConv, MBConv
from torchvision.models.mobilenetv2 import InvertedResidual as InvertedResidualV2
from torchvision.models.mobilenetv3 import InvertedResidual as InvertedResidualV3
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from ..models.blocks import Placement, register_placement

__all__ = [
    "AttendedBasicBlock",
    "AttendedBottleneck",
    "AttendedCNBlock",
    "AttendedFusedMBConv",
    "AttendedInvertedResidualV2",
    "AttendedInvertedResidualV3",
    "AttendedMBConv",
    "AttendedResBottleneckBlock",
]


def _last_norm(sequence: nn.Sequential) -> nn.Module | None:
    """The normalisation that ends ``sequence`` (descending into a trailing Conv2dNormActivation), or None when an
    activation follows it (nothing linear in front of the slot to scale)."""
    last = sequence[-1]
    if isinstance(last, nn.Sequential):
        return _last_norm(last)
    norms = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return last if isinstance(last, norms) else None


class AttendedBasicBlock(BasicBlock):
    """torchvision BasicBlock with ``attn`` after ``bn2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.attn(out)
        return self.relu(out + shortcut)


class AttendedBottleneck(Bottleneck):
    """torchvision Bottleneck (ResNet, ResNeXt, Wide ResNet) with ``attn`` after ``bn3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.relu(out + shortcut)


class AttendedInvertedResidualV2(InvertedResidualV2):
    """MobileNetV2 block with ``attn`` after the projection's BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.conv(x))
        return x + out if self.use_res_connect else out


class AttendedInvertedResidualV3(InvertedResidualV3):
    """MobileNetV3 block with ``attn`` after the projection's BatchNorm (its own SE stays inside the branch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.block(x))
        return x + out if self.use_res_connect else out


class AttendedMBConv(MBConv):
    """EfficientNet MBConv with ``attn`` after the projection's BatchNorm, before stochastic depth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.block(x))
        return x + self.stochastic_depth(out) if self.use_res_connect else out


class AttendedFusedMBConv(FusedMBConv):
    """EfficientNetV2 FusedMBConv with ``attn`` at the end of its branch, before stochastic depth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.block(x))
        return x + self.stochastic_depth(out) if self.use_res_connect else out


class AttendedResBottleneckBlock(ResBottleneckBlock):
    """RegNet block with ``attn`` after the last BatchNorm of its branch ``f``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        out = self.attn(self.f(x))
        return self.activation(out + shortcut)


class AttendedCNBlock(CNBlock):
    """ConvNeXt block with ``attn`` after the layer scale, before stochastic depth and the shortcut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.layer_scale * self.block(x))
        return x + self.stochastic_depth(out)


register_placement(BasicBlock, Placement("attn", "bn2"), attended=AttendedBasicBlock)
register_placement(Bottleneck, Placement("attn", "bn3"), attended=AttendedBottleneck)
_inverted = Placement("attn", lambda b: _last_norm(b.conv), channels=lambda b: b.out_channels)
register_placement(InvertedResidualV2, _inverted, attended=AttendedInvertedResidualV2)
_block_end = Placement("attn", lambda b: _last_norm(b.block), channels=lambda b: b.out_channels)
register_placement(InvertedResidualV3, _block_end, attended=AttendedInvertedResidualV3)
register_placement(MBConv, _block_end, attended=AttendedMBConv)
register_placement(FusedMBConv, _block_end, attended=AttendedFusedMBConv)
register_placement(
    ResBottleneckBlock, Placement("attn", lambda b: _last_norm(b.f.c)), attended=AttendedResBottleneckBlock
)
register_placement(CNBlock, Placement("attn", "layer_scale"), attended=AttendedCNBlock)
