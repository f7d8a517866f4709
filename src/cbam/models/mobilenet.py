"""MobileNet v1 (Howard et al. 2017) with optional SE / CBAM / BAM attention: the networks of CBAM Table 5.

Stem: 3x3 stride-2 conv to 32 channels, BN, ReLU. Then 13 depthwise-separable blocks (3x3 depthwise conv,
BN, ReLU; 1x1 pointwise conv, BN, ReLU) with widths 64, 128, 128, 256, 256, 512 x 6, 1024, 1024 and stride 2
at the 2nd, 4th, 6th and 12th block; global average pool; fully connected classifier. Convs have no bias.

Where the attention sits. CBAM's paper (Woo et al., ECCV 2018, Table 5) does not say; its counts do.

* Parameters: at width 1.0, r = 16 modules whose MLP has biases add 0.84M (4.23M -> 5.07M) only if there is
  one after the depthwise AND one after the pointwise conv of each of the 13 blocks (after the pointwise
  convs alone they would add 0.49M). Mirroring the ResNet placement (after the last BN of a branch), each
  is applied after its conv's BN and before the ReLU: ``attn_dw`` and ``attn_pw`` in every block.
* GFLOPs: with those 26 modules CBAM counts 0.5746 / 0.2880 GMACs at width 1.0 / 0.7, but the paper prints
  0.576 / 0.289. Both gaps are ~0.0012G, exactly one 7x7 spatial conv on a 112x112 map (98 * 112^2 =
  1.23M MACs), and SE's counts are unaffected: there is one more module at 112x112. We put it after the
  stem conv's BN (``attn_stem``, ``stem_attn=True``): attention after every conv + BN of the network, 27
  modules. Its 162-262 parameters do not show at 0.01M. (A module on the input of each depthwise conv
  instead of its output counts the same to 0.001G; the table cannot tell these apart.)
* MLP width: the paper's 2.71M for SE at width 0.7 needs hidden = round(C / 16) (``attn_hidden_rounding=
  "round"``); C // 16 gives 2.70M. At width 1.0 all widths are multiples of 16 and the two agree.

BAM (Park et al., BMVC 2018) goes at the ends of the 112, 56, 28 and 14 pixel stages, i.e. before each
stride-2 block (``bam1``-``bam4``); blocks and stem then have no attention.

Width multiplier. Channels are ``int(c * width_mult)`` (truncation, as in the original TensorFlow slim
MobileNet v1 with ``min_depth`` 8), the rounding that reproduces Table 5 at width 0.7: 2.30M params and
0.283 GMACs. Rounding to nearest gives 2.30M / 0.285; to a multiple of 8, 2.32M / 0.287.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._helpers import AttnArg, init_weights, make_attn, resolve_attention
from ._registry import register_model
from .resnet import GlobalAvgPool

__all__ = ["DepthwiseSeparable", "MobileNetV1", "round_channels"]

# (output channels at width 1.0, stride) of the 13 depthwise-separable blocks.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def round_channels(channels: int, width_mult: float, min_channels: int = 8) -> int:
    """``max(min_channels, int(channels * width_mult))``: slim's truncation, which matches CBAM Table 5."""
    return max(min_channels, int(channels * width_mult))


class DepthwiseSeparable(nn.Module):
    """dw 3x3 conv, BN, ``attn_dw``, ReLU, pw 1x1 conv, BN, ``attn_pw``, ReLU (attention after each BN)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        attn_layer: type[nn.Module] | None = None,
        attn_kwargs: dict[str, Any] | None = None,
        attn_hidden_rounding: str = "round",
    ) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_ch)
        self.attn_dw = make_attn(attn_layer, in_ch, attn_kwargs, attn_hidden_rounding)
        # In place only without attention: an attention module may have saved its output for backward.
        self.act_dw = nn.ReLU(inplace=attn_layer is None)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(out_ch)
        self.attn_pw = make_attn(attn_layer, out_ch, attn_kwargs, attn_hidden_rounding)
        self.act_pw = nn.ReLU(inplace=attn_layer is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_dw(self.attn_dw(self.bn_dw(self.conv_dw(x))))
        return self.act_pw(self.attn_pw(self.bn_pw(self.conv_pw(x))))


class MobileNetV1(nn.Module):
    """MobileNet v1 with attention after every conv + BN (SE, CBAM) or between stages (BAM).

    Args:
        width_mult: the paper's alpha; every width (stem included) becomes ``int(c * alpha)``, at least 8.
        attention, attn_kwargs: as for ResNet.
        stem_attn: also put attention after the stem (``attn_stem``); needed for Table 5's CBAM GFLOPs.
        attn_hidden_rounding: MLP width C / r rounded ``"round"`` (Table 5) or ``"floor"`` (C // r).
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        attention: AttnArg = None,
        attn_kwargs: dict[str, Any] | None = None,
        stem_attn: bool = True,
        attn_hidden_rounding: str = "round",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        attn_cls, at_stage_ends = resolve_attention(attention)
        block_attn = None if at_stage_ends else attn_cls
        self.num_classes = num_classes
        self.width_mult = width_mult
        stem = round_channels(32, width_mult)
        self.conv_stem = nn.Conv2d(in_chans, stem, 3, stride=2, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(stem)
        self.attn_stem = make_attn(block_attn if stem_attn else None, stem, attn_kwargs, attn_hidden_rounding)
        self.act_stem = nn.ReLU(inplace=block_attn is None or not stem_attn)
        blocks, bam_after, in_ch = [], [], stem
        for i, (c, stride) in enumerate(BLOCKS):
            if stride == 2:
                bam_after.append((i - 1, in_ch))  # the stage ends at the block before a stride-2 block
            out_ch = round_channels(c, width_mult)
            blocks.append(
                DepthwiseSeparable(
                    in_ch,
                    out_ch,
                    stride,
                    attn_layer=block_attn,
                    attn_kwargs=attn_kwargs,
                    attn_hidden_rounding=attn_hidden_rounding,
                )
            )
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self._bam_after = {}
        for k, (idx, ch) in enumerate(bam_after):
            bam = make_attn(attn_cls if at_stage_ends else None, ch, attn_kwargs, attn_hidden_rounding)
            self.add_module(f"bam{k + 1}", bam)
            self._bam_after[idx] = f"bam{k + 1}"
        self.num_features = in_ch
        self.global_pool = GlobalAvgPool()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self, skip=(attn_cls,) if attn_cls is not None else ())

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_stem(self.attn_stem(self.bn_stem(self.conv_stem(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._bam_after:
                x = getattr(self, self._bam_after[i])(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.global_pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(model_cls=MobileNetV1)
def mobilenet_v1(
    *, attention: AttnArg = None, num_classes: int = 1000, width_mult: float = 1.0, **kwargs: Any
) -> MobileNetV1:
    """MobileNet v1; width 1.0: 4.23M params, 0.569 GMACs; width 0.7: 2.30M, 0.283 (CBAM Table 5)."""
    return MobileNetV1(attention=attention, num_classes=num_classes, width_mult=width_mult, **kwargs)
