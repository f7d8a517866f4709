"""Helpers of the fused-path tests: BatchNorms far from their identity start, and the bytes saved for backward."""

from __future__ import annotations

from collections.abc import Callable

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


def randomise_all(model: nn.Module) -> nn.Module:
    """:func:`randomise` every BatchNorm2d of ``model``."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomise(module)
    return model


def saved_bytes(step: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward during ``step`` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())
