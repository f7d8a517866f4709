"""``cbam.fuse``: block-level speed as an explicit, reversible transform.

The paper's networks (``cbam.models``) are written as torchvision writes them: ``out = attn(bn(conv(out)));
relu(out + shortcut)``. A CBAM module on its own already runs the CPU kernels; what it cannot do on its own is take
what surrounds it. :func:`fuse` walks any module tree, finds the block types registered here (a small registry keyed
by block type, :func:`register_fusion`) whose attention is a CBAM, and turns each into its fused form, a subclass that
adds no parameter and only overrides ``forward``; :func:`unfuse` turns them back. The state dict is untouched, so
checkpoints move freely between fused and unfused models. A fused block computes the same function:

* the block's last BatchNorm is folded into the kernels' reads (its normalised map is never written, read or kept);
* the residual addition and the ReLU happen in the kernels' output pass (one pass over the block's output, not three);
* at inference a downsampling shortcut's BatchNorm is folded into that pass's read of the shortcut, and the block's
  output is written over its last convolution's output, which nothing else holds (as a compiled plain network's
  BatchNorm, addition and ReLU do), so the output pass writes lines that are still in the cache;
* with ``memory_efficient=True``, in training the last BatchNorm and the CBAM module are recomputed in the backward
  pass instead of keeping their outputs (activation checkpointing that does not update the BatchNorm statistics twice),
  so the network keeps for backward what the plain network keeps, on any device.

Each of these applies where it can (a CPU map the kernels take, a plain ``nn.BatchNorm2d``; no gradient or batch
statistics for the inference-only ones); anywhere else the block's modules run one after the other. While a forward or
backward hook observes a module inside a fused block the block runs its plain ``forward``, so every hook sees exactly
what it saw before fusion. (Global module hooks, which tools such as ``FlopCounterMode`` use to follow the module tree,
see the modules that run.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..insertion import timm as timm_blocks
from ..insertion.torchvision import AttendedBasicBlock, AttendedBottleneck
from ..layers.cbam import CBAM
from ..models.blocks import registered_blocks, set_fused_type
from ..models.cifar import CifarBasicBlock
from ..models.mobilenet import DepthwiseSeparable, MobileNetV1
from ..models.resnet import BasicBlock, Bottleneck
from .function import cbam_fused, hooked, serves, supported

__all__ = ["FusedBlock", "fuse", "fused_types", "register_fusion", "unfuse"]


class FusedBlock:
    """Mixin of the fused block types: the attention slots the fused ``forward`` handles, the fusion decision and the
    per-call choice between the fused computation and the block's own ``forward``.

    A fused type ``F`` registered for block type ``B`` is ``class F(FusedBlock, B)`` overriding ``forward`` only."""

    #: names of the block's attention modules the fused forward computes (each must be a CBAM for the block to fuse)
    attention_slots: tuple[str, ...] = ("attn",)
    #: names of the submodules whose hooks force the plain forward (None: every module inside the block)
    observed_parts: tuple[str, ...] | None = None
    memory_efficient: bool = False

    @classmethod
    def fusable(cls, block: nn.Module, memory_efficient: bool) -> str | None:
        """None if fusing ``block`` changes how it runs, else why it is left as it is."""
        for slot in cls.attention_slots:
            attn = getattr(block, slot)
            if not isinstance(attn, CBAM):
                return f"{slot} is {type(attn).__name__}, not CBAM"
            reason = supported(attn)
            if reason is not None and not memory_efficient:
                return f"the CPU kernels do not compute {slot}: {reason}"
        return None

    def observed(self) -> bool:
        """True while a hook would see a module of this block that the fused forward does not call as it was."""
        if self.observed_parts is None:
            return any(hooked(m) for m in self.children())  # type: ignore[attr-defined]
        return any(hooked(getattr(self, name)) for name in self.observed_parts)

    def lean(self, x: torch.Tensor) -> bool:
        """Recompute in backward: memory_efficient, and a backward will come."""
        return self.memory_efficient and torch.is_grad_enabled() and x.requires_grad

    def norm_attention(self, norm: nn.Module, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``attn(norm(x))`` for the output ``x`` of the convolution in front of ``norm``, which nothing else holds."""
        if isinstance(attn, CBAM) and self.lean(x):
            return recomputed(norm, attn, x)
        if isinstance(attn, CBAM) and serves(x) and supported(attn) is None:
            return cbam_fused(attn, x, norm=norm, inplace=True)
        return attn(norm(x))

    def residual_tail(
        self,
        norm: nn.Module,
        attn: nn.Module,
        x: torch.Tensor,
        shortcut: torch.Tensor,
        shortcut_norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """``relu(attn(norm(x)) + shortcut_norm(shortcut))``, the end of a residual block, for the output ``x`` of
        its last convolution, which nothing else holds (``shortcut_norm`` optional)."""
        fits = shortcut.shape == x.shape and shortcut.dtype == x.dtype and shortcut.device == x.device
        if not self.lean(x) and fits and serves(x) and supported(attn) is None:
            return cbam_fused(attn, x, residual=shortcut, norm=norm, residual_norm=shortcut_norm, inplace=True)
        shortcut = shortcut if shortcut_norm is None else shortcut_norm(shortcut)
        out = recomputed(norm, attn, x) if self.lean(x) else attn(norm(x))
        return torch.relu_(out + shortcut)


@contextlib.contextmanager
def frozen_running_stats(*modules: nn.Module) -> Iterator[None]:
    """BatchNorms inside ``modules`` normalise with batch statistics but leave their running ones alone."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def recomputed(norm: nn.Module, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``attn(norm(x))`` under activation checkpointing: only ``x`` is kept (the BatchNorm keeps it anyway), both are
    recomputed in backward, without a second update of the BatchNorm statistics."""
    return checkpoint(
        lambda t: attn(norm(t)),
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), frozen_running_stats(norm, attn)),
    )


def split_shortcut(downsample: nn.Module | None, x: torch.Tensor) -> tuple[torch.Tensor, nn.Module | None]:
    """A block's shortcut as (tensor, BatchNorm still to apply to it, or None): a downsampling ``nn.Sequential`` ending
    with a BatchNorm (torchvision's ``conv1x1, BatchNorm2d``) runs without its last module, which the kernels fold
    into their output pass at inference."""
    if downsample is None:
        return x, None
    if isinstance(downsample, nn.Sequential) and len(downsample) > 1 and isinstance(downsample[-1], nn.BatchNorm2d):
        for module in list(downsample)[:-1]:
            x = module(x)
        return x, downsample[-1]
    return downsample(x), None


# ----------------------------------------------------------------------------------------------------------------------
# The registry and the transform
# ----------------------------------------------------------------------------------------------------------------------
def register_fusion(block_type: type[nn.Module], fused_type: type[nn.Module] | None = None):
    """Register ``fused_type`` as the fused form of ``block_type``; usable as a class decorator,
    ``@register_fusion(MyBlock) class FusedMyBlock(FusedBlock, MyBlock): def forward(self, x): ...``.

    The fused type must subclass both :class:`FusedBlock` and ``block_type`` and define no ``__init__``: fusing swaps
    an instance's class, so the fused type adds no parameter, buffer or state-dict key."""

    def register(fused: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
            raise TypeError(f"register_fusion: expected an nn.Module subclass as the block type, got {block_type!r}")
        if not (isinstance(fused, type) and issubclass(fused, FusedBlock) and issubclass(fused, block_type)):
            raise TypeError(
                f"register_fusion: the fused type must subclass FusedBlock and {block_type.__name__}, got {fused!r}"
            )
        if "__init__" in vars(fused):
            raise TypeError(f"register_fusion: {fused.__name__} must not define __init__ (fusing swaps the class)")
        set_fused_type(block_type, fused)
        fused.fused_from = block_type  # type: ignore[attr-defined]
        return fused

    return register if fused_type is None else register(fused_type)


def fused_types() -> dict[type[nn.Module], type[nn.Module]]:
    """Block type -> its fused type, from the block registry that :func:`cbam.insert` shares."""
    return {kind: spec.fused for kind, spec in registered_blocks().items() if spec.fused is not None}


def fuse(model: nn.Module, *, memory_efficient: bool = False) -> list[str]:
    """Turn every registered block of ``model`` whose attention is a CBAM into its fused form, in place; returns the
    module paths it changed ("" is ``model`` itself). Fusing a fused model again only changes ``memory_efficient``
    where it differs. Blocks of other types, or whose attention is not a CBAM the kernels compute (unless
    ``memory_efficient``), are left as they are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"fuse: memory_efficient must be True or False, got {memory_efficient!r}")
    fusions = fused_types()
    fused_set = set(fusions.values())
    changed = []
    for path, module in model.named_modules():
        kind = type(module)
        if kind in fused_set:
            if module.memory_efficient != memory_efficient:
                module.memory_efficient = memory_efficient
                changed.append(path)
            continue
        fused = fusions.get(kind)
        if fused is None or fused.fusable(module, memory_efficient) is not None:
            continue
        module.__class__ = fused
        module.memory_efficient = memory_efficient
        changed.append(path)
    return changed


def unfuse(model: nn.Module) -> list[str]:
    """Turn every fused block of ``model`` back into its plain type, in place; returns the module paths it changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse: expected an nn.Module, got {type(model).__name__}")
    fused_set = set(fused_types().values())
    changed = []
    for path, module in model.named_modules():
        if isinstance(module, FusedBlock) and type(module) in fused_set:
            module.__class__ = type(module).fused_from
            vars(module).pop("memory_efficient", None)
            changed.append(path)
    return changed


# ----------------------------------------------------------------------------------------------------------------------
# The package's own blocks
# ----------------------------------------------------------------------------------------------------------------------
class BasicTail(FusedBlock):
    """The fused forward of a torchvision-style basic block (``conv1 bn1 relu conv2 bn2 attn``, ``downsample``): its
    tail ``relu(attn(bn2(.)) + shortcut)`` in the kernels. Shared by this package's block and torchvision's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed():
            return self.fused_from.forward(self, x)
        shortcut, shortcut_norm = split_shortcut(self.downsample, x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.residual_tail(self.bn2, self.attn, self.conv2(out), shortcut, shortcut_norm)


class BottleneckTail(FusedBlock):
    """The fused forward of a torchvision-style bottleneck (``conv1..3 bn1..3 relu attn``, ``downsample``): its tail
    ``relu(attn(bn3(.)) + shortcut)`` in the kernels. Shared by this package's block and torchvision's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed():
            return self.fused_from.forward(self, x)
        shortcut, shortcut_norm = split_shortcut(self.downsample, x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.residual_tail(self.bn3, self.attn, self.conv3(out), shortcut, shortcut_norm)


@register_fusion(BasicBlock)
class FusedBasicBlock(BasicTail, BasicBlock):
    """BasicBlock with its tail ``relu(attn(bn2(.)) + shortcut)`` in the kernels."""


@register_fusion(Bottleneck)
class FusedBottleneck(BottleneckTail, Bottleneck):
    """Bottleneck with its tail ``relu(attn(bn3(.)) + shortcut)`` in the kernels."""


@register_fusion(CifarBasicBlock)
class FusedCifarBasicBlock(FusedBlock, CifarBasicBlock):
    """CifarBasicBlock with its tail ``relu(attn(bn2(.)) + shortcut)`` in the kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed():
            return super().forward(x)
        shortcut = self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.residual_tail(self.bn2, self.attn, self.conv2(out), shortcut)


@register_fusion(DepthwiseSeparable)
class FusedDepthwiseSeparable(FusedBlock, DepthwiseSeparable):
    """DepthwiseSeparable with each BatchNorm folded into the CBAM that follows it."""

    attention_slots = ("attn_dw", "attn_pw")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed():
            return super().forward(x)
        x = self.act_dw(self.norm_attention(self.bn_dw, self.attn_dw, self.conv_dw(x)))
        return self.act_pw(self.norm_attention(self.bn_pw, self.attn_pw, self.conv_pw(x)))


@register_fusion(MobileNetV1)
class FusedMobileNetV1(FusedBlock, MobileNetV1):
    """MobileNetV1 with the stem's BatchNorm folded into the CBAM that follows it (the blocks fuse on their own)."""

    attention_slots = ("attn_stem",)
    observed_parts = ("conv_stem", "bn_stem", "attn_stem", "act_stem")

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed():
            return super().forward_stem(x)
        return self.act_stem(self.norm_attention(self.bn_stem, self.attn_stem, self.conv_stem(x)))


# ----------------------------------------------------------------------------------------------------------------------
# torchvision's ResNet blocks after cbam.insert (same attribute names as the package's own)
# ----------------------------------------------------------------------------------------------------------------------
@register_fusion(AttendedBasicBlock)
class FusedTorchvisionBasicBlock(BasicTail, AttendedBasicBlock):
    """torchvision's BasicBlock with inserted CBAM, its tail in the kernels."""


@register_fusion(AttendedBottleneck)
class FusedTorchvisionBottleneck(BottleneckTail, AttendedBottleneck):
    """torchvision's Bottleneck with inserted CBAM, its tail in the kernels."""


# ----------------------------------------------------------------------------------------------------------------------
# timm's ResNet blocks after cbam.insert (their own ``se`` slot holds the CBAM), when timm is installed
# ----------------------------------------------------------------------------------------------------------------------
class TimmTail(FusedBlock):
    """timm's blocks run fused where their tail is ``relu(se(bn(.)) + shortcut)``: no drop path, a ReLU at the end."""

    attention_slots = ("se",)

    def plain(self) -> bool:
        return self.observed() or self.drop_path is not None or type(self.final_act) is not nn.ReLU


if timm_blocks.AVAILABLE:

    @register_fusion(timm_blocks.BasicBlock)
    class FusedTimmBasicBlock(TimmTail, timm_blocks.BasicBlock):
        """timm's BasicBlock with CBAM in ``se``, its tail in the kernels."""

        @property
        def final_act(self) -> nn.Module:
            return self.act2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.plain():
                return self.fused_from.forward(self, x)
            shortcut, shortcut_norm = split_shortcut(self.downsample, x)
            out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
            return self.residual_tail(self.bn2, self.se, self.conv2(out), shortcut, shortcut_norm)

    @register_fusion(timm_blocks.Bottleneck)
    class FusedTimmBottleneck(TimmTail, timm_blocks.Bottleneck):
        """timm's Bottleneck with CBAM in ``se``, its tail in the kernels."""

        @property
        def final_act(self) -> nn.Module:
            return self.act3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.plain():
                return self.fused_from.forward(self, x)
            shortcut, shortcut_norm = split_shortcut(self.downsample, x)
            out = self.act1(self.bn1(self.conv1(x)))
            out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
            return self.residual_tail(self.bn3, self.se, self.conv3(out), shortcut, shortcut_norm)
