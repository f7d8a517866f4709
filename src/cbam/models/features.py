"""Multi-scale feature maps of the package's networks (skeleton; filled in by issue 14's features work)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["features_only"]


def features_only(model: nn.Module, out_indices: Sequence[int] | None = None) -> nn.Module:
    raise NotImplementedError("features_only is being written")
