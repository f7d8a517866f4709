"""What the package knows about each block type: where attention goes in it, and its fused form.

One small registry keyed by block type serves two transforms. :func:`cbam.insert` reads a block's
:class:`Placement` (the attribute that holds the attention module, the normalisation right in front of it) to put
CBAM or SE where the paper puts it, into networks built elsewhere (torchvision, timm, your own). :func:`cbam.fuse`
reads the block's fused type to run it with the CPU kernels. Registering a placement for your own block type is
one call::

    cbam.register_placement(MyBlock, cbam.Placement(slot="attn", norm="bn2"), attended=MyBlockWithAttention)

``attended`` is needed only when ``MyBlock.forward`` does not call ``self.attn`` itself: a subclass that defines no
``__init__`` and whose ``forward`` applies the slot (insertion swaps the instance's class to it, so the block's
state-dict keys stay what they were and the attention's keys are added under the slot's name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .cifar import CifarBasicBlock
from .mobilenet import DepthwiseSeparable, MobileNetV1
from .resnet import BasicBlock, Bottleneck

__all__ = [
    "BlockSpec",
    "Placement",
    "block_spec",
    "register_placement",
    "registered_blocks",
    "set_fused_type",
]


@dataclass(frozen=True)
class Placement:
    """One attention site of a block.

    Args:
        slot: the attribute that holds the attention module (an ``nn.Identity`` or None while empty).
        norm: dotted path (from the block) of what produces the slot's input: a normalisation with an affine scale
            and shift, or a scale parameter (ConvNeXt's ``layer_scale``); or a function of the block returning it.
            Its channel count sizes the attention module, and identity initialisation scales it.
        channels: a function of the block giving the slot's channel count, when ``norm`` cannot tell.
    """

    slot: str
    norm: str | Callable[[nn.Module], nn.Module | nn.Parameter]
    channels: Callable[[nn.Module], int] | None = None

    def norm_of(self, block: nn.Module) -> nn.Module | nn.Parameter:
        if callable(self.norm):
            return self.norm(block)
        target = block
        for part in self.norm.split("."):
            indexed = part.isdigit() and isinstance(target, nn.Sequential)
            target = target[int(part)] if indexed else getattr(target, part)
        return target

    def channels_of(self, block: nn.Module) -> int:
        if self.channels is not None:
            return int(self.channels(block))
        norm = self.norm_of(block)
        for attr in ("num_features", "num_channels"):  # BatchNorm / FrozenBatchNorm2d, GroupNorm
            if isinstance(getattr(norm, attr, None), int):
                return getattr(norm, attr)
        if isinstance(norm, nn.LayerNorm):
            return int(norm.normalized_shape[0])
        if isinstance(norm, torch.Tensor):  # a scale parameter such as ConvNeXt's layer_scale
            return int(norm.shape[0])
        weight = getattr(norm, "weight", None)  # torchvision's FrozenBatchNorm2d keeps only its buffers
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            return int(weight.shape[0])
        raise TypeError(f"cannot tell the channel count of {type(norm).__name__}; give the Placement a channels=")


@dataclass
class BlockSpec:
    """A registered block type: its attention sites, the subclass that applies them, and its fused form."""

    block_type: type[nn.Module]
    placements: tuple[Placement, ...] = ()
    attended: type[nn.Module] | None = None  # None: the block's own forward already calls every slot
    fused: type[nn.Module] | None = None
    plain: type[nn.Module] | None = field(default=None)  # for an attended type: the type it was inserted into


_BLOCKS: dict[type[nn.Module], BlockSpec] = {}


def _check_type(what: str, cls: object) -> type[nn.Module]:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{what}: expected an nn.Module subclass, got {cls!r}")
    return cls


def register_placement(
    block_type: type[nn.Module], *placements: Placement, attended: type[nn.Module] | None = None
) -> None:
    """Tell :func:`cbam.insert` where attention goes in ``block_type`` (one :class:`Placement` per site)."""
    _check_type("register_placement", block_type)
    if not placements or not all(isinstance(p, Placement) for p in placements):
        raise TypeError(
            f"register_placement({block_type.__name__}): expected one or more Placement, got {placements!r}"
        )
    if attended is not None:
        _check_type("register_placement: attended", attended)
        if not issubclass(attended, block_type) or "__init__" in vars(attended):
            raise TypeError(
                f"register_placement: attended type {attended.__name__} must subclass {block_type.__name__} "
                "and define no __init__ (insertion swaps the instance's class)"
            )
    spec = _BLOCKS.setdefault(block_type, BlockSpec(block_type))
    if spec.placements and (spec.placements, spec.attended) != (tuple(placements), attended):
        raise ValueError(f"register_placement: {block_type.__name__} already has a placement")
    spec.placements, spec.attended = tuple(placements), attended
    if attended is not None:
        twin = _BLOCKS.setdefault(attended, BlockSpec(attended))
        twin.placements, twin.plain = tuple(placements), block_type


def set_fused_type(block_type: type[nn.Module], fused: type[nn.Module]) -> None:
    """Record ``fused`` as the fused form of ``block_type`` (``cbam.fused.register_fusion`` checks and calls this)."""
    spec = _BLOCKS.setdefault(block_type, BlockSpec(block_type))
    if spec.fused is not None and spec.fused is not fused:
        raise ValueError(f"register_fusion: {block_type.__name__} already has {spec.fused.__name__}")
    spec.fused = fused


def block_spec(block_type: type[nn.Module]) -> BlockSpec | None:
    """The registered spec of exactly ``block_type`` (a fused type maps to the spec of the type it fuses)."""
    spec = _BLOCKS.get(block_type)
    if spec is None:
        for candidate in _BLOCKS.values():
            if candidate.fused is block_type:
                return candidate
    return spec


def registered_blocks() -> dict[type[nn.Module], BlockSpec]:
    """Block type -> spec, a copy of the registry."""
    return dict(_BLOCKS)


# The package's own blocks: the slot exists (an nn.Identity without attention) and forward already calls it.
register_placement(BasicBlock, Placement("attn", "bn2"))
register_placement(Bottleneck, Placement("attn", "bn3"))
register_placement(CifarBasicBlock, Placement("attn", "bn2"))
register_placement(DepthwiseSeparable, Placement("attn_dw", "bn_dw"), Placement("attn_pw", "bn_pw"))
register_placement(MobileNetV1, Placement("attn_stem", "bn_stem"))
