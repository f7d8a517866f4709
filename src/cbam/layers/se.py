"""SE: Squeeze-and-Excitation (Hu, Shen, Sun, CVPR 2018), the baseline CBAM's paper compares against.

Average-pool over H x W, an MLP C -> C/r -> C with biases and ReLU, a sigmoid, a per-channel multiply. It is
the CBAM channel gate with average pooling only (the paper's Table 1 row "avg"); on ResNet-50 the paper
reports 23.14 % top-1 error for SE against 22.66 % for CBAM.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_feature_map, check_positive_int, make_act, make_gate
from .cbam import hidden_width


class SE(nn.Module):
    """Squeeze-and-Excitation gate with ``fc1`` (C -> hidden) and ``fc2`` (hidden -> C) as ``nn.Linear``."""

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        hidden: int | None = None,
        bias: bool = True,
        act_layer: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        if hidden is None:
            hidden = hidden_width(name, channels, reduction)
        self.hidden = check_positive_int(name, "hidden", hidden)
        self.fc1 = nn.Linear(channels, self.hidden, bias=bias)
        self.act = make_act(name, act_layer)
        self.fc2 = nn.Linear(self.hidden, channels, bias=bias)
        self.gate = make_gate(name, gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, self.channels)
        w = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3)))))
        return x * self.gate(w)[:, :, None, None]
