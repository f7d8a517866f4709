"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018), the same authors' earlier module.

``F' = F * (1 + sigmoid(Mc(F) + Ms(F)))``: a channel branch (average pool, MLP with a BatchNorm'd hidden
layer) and a spatial branch (1 x 1 reduction, two dilated 3 x 3 convs, 1 x 1 to one map), broadcast to
C x H x W and **added**, as the BAM paper's equation says. The authors' release multiplies the two
branches instead (and raises NameError when the module is constructed); we follow the paper. BAM sits
between stages ("bottlenecks") of a network, not in every block.

Being built on BatchNorm, the channel branch needs a batch of at least 2 in training mode.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_feature_map, check_positive_int
from .cbam import hidden_width


class BAM(nn.Module):
    """Bottleneck Attention Module with ``channel`` and ``spatial`` branches."""

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        hidden: int | None = None,
        dilation: int = 4,
        num_dilated: int = 2,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        if hidden is None:
            hidden = hidden_width(name, channels, reduction)
        hidden = check_positive_int(name, "hidden", hidden)
        check_positive_int(name, "dilation", dilation)
        self.channel = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        for _ in range(num_dilated):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.spatial = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, self.channels)
        channel = self.channel(x.mean(dim=(2, 3)))[:, :, None, None]  # (N, C, 1, 1)
        spatial = self.spatial(x)  # (N, 1, H, W)
        return x * (1 + torch.sigmoid(channel + spatial))
