"""The classic CIFAR ResNets of He et al. (CVPR 2016, Sec. 4.2) with optional SE / CBAM / BAM attention.

A 3x3 conv to 16 channels, three stages of n basic blocks at 16/32/64 channels (32x32, 16x16, 8x8), global
average pool and a linear classifier: 6n + 2 layers (n = 3, 9, 18 gives ResNet-20/56/110; ResNet-20 has
0.27M parameters). Shortcuts that change shape are the paper's parameter-free option A: subsample by the
stride and zero-pad the new channels, so attention is the only thing that adds parameters.

Attention follows CBAM (Woo et al., ECCV 2018): ``attn`` on the residual branch after the block's last BN,
before the identity is added; BAM (Park et al., BMVC 2018) after stages 1 and 2 (``bam1``, ``bam2``).
These small networks are the quick way to compare attention variants on CIFAR, which the CBAM authors'
release has no recipe for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._helpers import AttnArg, init_weights, make_attn, resolve_attention
from ._registry import register_model
from .resnet import GlobalAvgPool

__all__ = ["CifarBasicBlock", "CifarResNet", "ShortcutA"]


class ShortcutA(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and zero-pad channels evenly on both sides."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.pad = (out_ch - in_ch) // 2, out_ch - in_ch - (out_ch - in_ch) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """Two 3x3 convs; attention ``attn`` after ``bn2``; option-A ``shortcut`` when the shape changes."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        attn_layer: type[nn.Module] | None = None,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.attn = make_attn(attn_layer, out_ch, attn_kwargs)
        self.shortcut = ShortcutA(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.attn(out)
        out = out + shortcut
        return self.relu(out)


class CifarResNet(nn.Module):
    """He et al.'s 6n+2-layer CIFAR ResNet; ``depth`` = 6n + 2 (20, 32, 44, 56, 110, ...)."""

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        attention: AttnArg = None,
        attn_kwargs: dict[str, Any] | None = None,
        base_width: int = 16,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        attn_cls, at_stage_ends = resolve_attention(attention)
        block_attn = None if at_stage_ends else attn_cls
        widths = [base_width, 2 * base_width, 4 * base_width]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(
                    CifarBasicBlock(in_ch, width, stride, attn_layer=block_attn, attn_kwargs=attn_kwargs)
                )
                in_ch = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bam1 = make_attn(attn_cls if at_stage_ends else None, widths[0], attn_kwargs)
        self.bam2 = make_attn(attn_cls if at_stage_ends else None, widths[1], attn_kwargs)
        self.num_features = widths[2]
        self.avgpool = GlobalAvgPool()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self, skip=(attn_cls,) if attn_cls is not None else ())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bam1(self.layer1(x))
        x = self.bam2(self.layer2(x))
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(model_cls=CifarResNet, input_size=32)
def cifar_resnet8(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-8 for CIFAR (n = 1, one block per stage): 75K parameters; the smallest of He et al.'s family, for
    the CPU demo."""
    return CifarResNet(8, attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=CifarResNet, input_size=32)
def cifar_resnet20(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (n = 3): 0.27M parameters, 8.75% error on CIFAR-10 in He et al."""
    return CifarResNet(20, attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=CifarResNet, input_size=32)
def cifar_resnet56(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (n = 9): 0.85M parameters, 6.97% error on CIFAR-10 in He et al."""
    return CifarResNet(56, attention=attention, num_classes=num_classes, **kwargs)


@register_model(model_cls=CifarResNet, input_size=32)
def cifar_resnet110(*, attention: AttnArg = None, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (n = 18): 1.7M parameters, 6.43% error on CIFAR-10 in He et al."""
    return CifarResNet(110, attention=attention, num_classes=num_classes, **kwargs)
