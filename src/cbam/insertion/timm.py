"""timm's ResNet family (``timm.models.resnet``: ResNet, ResNeXt, Wide ResNet, SE/ECA variants, ...): where CBAM goes.

timm's blocks already have the slot: ``se``, applied after the branch's last BatchNorm and before drop-path and the
shortcut, and None when the network was built without attention. Insertion fills it; no class swap is needed.
Importing this module registers the placements when timm is installed (an optional dependency) and does nothing
otherwise.
"""

from __future__ import annotations

from ..models.blocks import Placement, register_placement

try:
    from timm.models.resnet import BasicBlock, Bottleneck
except ImportError:  # timm is optional
    BasicBlock = Bottleneck = None

AVAILABLE = BasicBlock is not None

if AVAILABLE:
    register_placement(BasicBlock, Placement("se", "bn2"))
    register_placement(Bottleneck, Placement("se", "bn3"))
