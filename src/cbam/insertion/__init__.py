"""CBAM in the networks people already have: :func:`insert` (where the paper puts it, identity-initialised so a
pretrained network keeps its outputs) and :func:`load_base_weights` (the original weights into the modified network).

Importing this package registers the placements of torchvision's ResNet / ResNeXt / Wide ResNet, MobileNetV2 and V3,
EfficientNet (V1 and V2), RegNet and ConvNeXt blocks, and of timm's ResNet family when timm is installed. The
registry (:mod:`cbam.models.blocks`) is the one :func:`cbam.fuse` uses, so an inserted torchvision ResNet fuses too.
"""

from ..models.blocks import Placement, register_placement, registered_blocks
from . import timm, torchvision  # noqa: F401  (import registers the placements)
from .core import (
    INITS,
    attention_sites,
    block_stages,
    identity_gate_,
    init_attention,
    insert,
    load_base_weights,
    supported_blocks,
)

__all__ = [
    "INITS",
    "Placement",
    "attention_sites",
    "block_stages",
    "init_attention",
    "identity_gate_",
    "insert",
    "load_base_weights",
    "register_placement",
    "registered_blocks",
    "supported_blocks",
]
