"""``cbam.create_model``: a registered network, with attention, weights from any supported checkpoint, as a
classifier or as a multi-scale feature extractor for detection and segmentation.

It composes three parts that each work on their own: :func:`cbam.models.create_model` (the network),
:func:`cbam.convert.load_into` (a checkpoint of this package, the authors' release, timm's or torchvision's,
detected and converted) and :func:`cbam.models.features.features_only` (the feature maps with their channels and
strides).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import models
from .convert import load_into
from .models.features import features_only as _features_only

__all__ = ["create_model"]


def create_model(
    name: str,
    *,
    attention: str | type[nn.Module] | None = None,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``name`` (see :func:`cbam.models.create_model` for ``attention``, ``num_classes`` and
    the keyword routing), load ``checkpoint`` into it when given, and with ``features_only=True`` return the
    feature extractor over the stages ``out_indices`` instead of the classifier."""
    if out_indices is not None and not features_only:
        raise ValueError("create_model: out_indices is for features_only=True")
    model = models.create_model(name, attention=attention, num_classes=num_classes, **kwargs)
    if checkpoint is not None:
        model.checkpoint_format = load_into(model, checkpoint)
    if features_only:
        return _features_only(model, out_indices)
    return model
