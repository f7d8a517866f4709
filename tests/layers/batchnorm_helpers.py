"""BatchNorms far from their identity start, for tests of folding them (imported by the layer tests)."""

from __future__ import annotations

import torch
from torch import nn


def randomise(norm: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Weight, bias (where the BatchNorm has them) and running statistics far from BatchNorm's identity start."""
    with torch.no_grad():
        if norm.affine:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
        norm.running_mean.uniform_(-0.4, 0.4)
        norm.running_var.uniform_(0.3, 2.0)
    return norm
