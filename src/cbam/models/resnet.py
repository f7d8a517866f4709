"""ResNet, WideResNet and ResNeXt with optional SE / CBAM / BAM attention: the networks of CBAM Table 4.

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, Sec. 4.2 and Fig. 3: the attention
module refines the residual branch of every block, after its last BatchNorm and before the identity is
added: ``out = relu(attn(bn_last(...)) + shortcut)``. BAM (Park et al., BMVC 2018) instead sits at the
ends of stages 1-3 (``bam1``-``bam3``), where its paper puts it.

Without attention the state dict is key-for-key torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``downsample.0``, ``fc``; the ``attn`` slot is an ``nn.Identity`` with no keys), so torchvision weights load
strictly. The stride of a downsampling bottleneck sits on the 3x3 conv ("v1.5", as torchvision and the
authors' release); ``stride_in_1x1=True`` moves it to the first 1x1 conv ("v1"), the convention the paper's
GFLOPs for ResNet-50/101 and ResNeXt were counted with (see ``cbam.models.paper``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._helpers import AttnArg, init_weights, make_attn, resolve_attention
from ._registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "GlobalAvgPool", "ResNet"]


class GlobalAvgPool(nn.Module):
    """The classifier head's global average pool, (N, C, H, W) -> (N, C, 1, 1), as a plain mean over H x W.

    It computes what ``nn.AdaptiveAvgPool2d(1)`` computes (which PyTorch itself lowers to this mean) and has no state,
    so state dicts do not change; written as a reduction, exported graphs (ONNX ``ReduceMean``) hold no adaptive
    pooling operator, which some runtimes reject with a dynamic image size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); attention ``attn`` after ``bn2``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
        attn_layer: type[nn.Module] | None = None,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 (widen it with widen)")
        del stride_in_1x1  # a basic block's only strided conv is its first one either way
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attn = make_attn(attn_layer, planes, attn_kwargs)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.attn(out)
        out = out + shortcut
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand; attention ``attn`` after ``bn3``."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
        attn_layer: type[nn.Module] | None = None,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out_ch = planes * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.attn = make_attn(attn_layer, out_ch, attn_kwargs)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.attn(out)
        out = out + shortcut
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet / WideResNet / ResNeXt with attention in every block (SE, CBAM) or between stages (BAM).

    Args:
        block, layers: block class and number of blocks per stage.
        attention: None, "se", "cbam", "bam" or an nn.Module class taking ``(channels, **attn_kwargs)``.
        attn_kwargs: passed to every attention module (e.g. ``{"reduction": 8}``).
        groups, width_per_group: ResNeXt cardinality and width (bottleneck width int(planes*w/64)*groups).
        widen: multiplies the widths of all four stages (the paper's WideResNet18 uses 1.5 and 2.0); the
            64-channel stem stays.
        stride_in_1x1: put a bottleneck's stride on its first 1x1 conv (v1) instead of the 3x3 (v1.5).
        cifar_stem: 3x3 stride-1 stem, no max pool, for 32x32 inputs (the authors' CIFAR variant).
        zero_init_residual: start each block's last BN at weight 0 (block starts as identity).
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        attention: AttnArg = None,
        attn_kwargs: dict[str, Any] | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        widen: float = 1.0,
        stride_in_1x1: bool = False,
        cifar_stem: bool = False,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet expects 4 stage depths, got {layers}")
        if widen <= 0:
            raise ValueError(f"widen must be positive, got {widen}")
        attn_cls, at_stage_ends = resolve_attention(attention)
        block_attn = None if at_stage_ends else attn_cls
        self.num_classes = num_classes
        self.inplanes = 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        common = dict(
            groups=groups,
            base_width=width_per_group,
            stride_in_1x1=stride_in_1x1,
            attn_layer=block_attn,
            attn_kwargs=attn_kwargs,
        )
        widths = [int(round(w * widen)) for w in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1, common)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2, common)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2, common)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2, common)
        # BAM after stages 1-3; Identity (no keys) otherwise.
        stage_ch = [w * block.expansion for w in widths]
        for i in range(3):
            bam = make_attn(attn_cls if at_stage_ends else None, stage_ch[i], attn_kwargs)
            self.add_module(f"bam{i + 1}", bam)
        self.num_features = stage_ch[3]
        self.avgpool = GlobalAvgPool()
        self.drop_rate = drop_rate
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

        init_weights(self, skip=(attn_cls,) if attn_cls is not None else ())
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        common: dict[str, Any],
    ) -> nn.Sequential:
        downsample = None
        out_ch = planes * block.expansion
        if stride != 1 or self.inplanes != out_ch:
            downsample = nn.Sequential(conv1x1(self.inplanes, out_ch, stride), nn.BatchNorm2d(out_ch))
        layers = [block(self.inplanes, planes, stride, downsample, **common)]
        self.inplanes = out_ch
        layers += [block(self.inplanes, planes, **common) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, num_features, H/32, W/32), e.g. for Grad-CAM."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.bam1(self.layer1(x))
        x = self.bam2(self.layer2(x))
        x = self.bam3(self.layer3(x))
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(block: type[BasicBlock | Bottleneck], layers: list[int], **kwargs: Any) -> ResNet:
    return ResNet(block, layers, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# ImageNet models (CBAM Table 4). Every builder is keyword-only; see ResNet for the options.
# ---------------------------------------------------------------------------------------------------------
@register_model(model_cls=ResNet)
def resnet18(*, attention: AttnArg = None, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al. 2016): 11.69M params, 1.814 GMACs; + CBAM 11.78M (Table 4)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet)
def resnet34(*, attention: AttnArg = None, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34: 21.80M params, 3.664 GMACs; + CBAM 21.96M (Table 4)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet)
def resnet50(*, attention: AttnArg = None, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50: 25.56M params, 3.858 GMACs (v1 counting); + CBAM 28.09M (Table 4)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet)
def resnet101(*, attention: AttnArg = None, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-101: 44.55M params, 7.570 GMACs (v1 counting); + CBAM 49.33M (Table 4)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet)
def resnet152(*, attention: AttnArg = None, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-152 (not in the paper; for completeness)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet)
def wide_resnet18(*, attention: AttnArg = None, num_classes: int = 1000, widen: float = 1.5, **kwargs: Any) -> ResNet:
    """The paper's WideResNet18: all four stages of ResNet-18 ``widen`` x wider (1.5: 25.88M; 2.0: 45.62M)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], attention=attention, num_classes=num_classes, widen=widen, **kwargs)


@register_model(model_cls=ResNet)
def resnext50_32x4d(*, attention: AttnArg = None, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017): 25.03M params, 3.768 GMACs (v1 counting) (Table 4)."""
    kwargs = {"groups": 32, "width_per_group": 4, **kwargs}
    return _resnet(Bottleneck, [3, 4, 6, 3], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet)
def resnext101_32x4d(*, attention: AttnArg = None, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x4d: 44.18M params, 7.508 GMACs (v1 counting) (Table 4)."""
    kwargs = {"groups": 32, "width_per_group": 4, **kwargs}
    return _resnet(Bottleneck, [3, 4, 23, 3], attention=attention, num_classes=num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# The authors' release's CIFAR form of the ImageNet ResNets: 3x3 stride-1 stem, no max pool.
# ---------------------------------------------------------------------------------------------------------
def _cifar(block: type[BasicBlock | Bottleneck], layers: list[int], **kwargs: Any) -> ResNet:
    kwargs.setdefault("cifar_stem", True)
    return _resnet(block, layers, **kwargs)


@register_model(model_cls=ResNet, input_size=32)
def resnet18_cifar(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-18 with the CIFAR stem of the authors' release (32x32 inputs)."""
    return _cifar(BasicBlock, [2, 2, 2, 2], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet, input_size=32)
def resnet34_cifar(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-34 with the CIFAR stem of the authors' release."""
    return _cifar(BasicBlock, [3, 4, 6, 3], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet, input_size=32)
def resnet50_cifar(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-50 with the CIFAR stem of the authors' release."""
    return _cifar(Bottleneck, [3, 4, 6, 3], attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=ResNet, input_size=32)
def resnet101_cifar(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-101 with the CIFAR stem of the authors' release."""
    return _cifar(Bottleneck, [3, 4, 23, 3], attention=attention, num_classes=num_classes, **kwargs)
