"""Checkpoints from elsewhere into this package's networks (skeleton: this package's own safetensors only)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..train.checkpoint import load_weights

__all__ = ["load_into"]


def load_into(model: nn.Module, path: str | Path) -> str:
    """Load the checkpoint at ``path`` into ``model`` (strictly); returns the detected format's name."""
    tensors = load_weights(path)
    model.load_state_dict(tensors, strict=True)
    return "cbam"
