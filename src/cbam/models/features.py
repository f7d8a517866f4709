"""Multi-scale feature maps of the package's networks, for detection and segmentation heads.

``features_only(model, out_indices)`` (or ``cbam.create_model(name, features_only=True, out_indices=...)``) returns a
:class:`FeatureNet` that follows timm's ``features_only`` conventions, so timm users need not learn new ones:

* ``forward(x)`` returns a list of tensors, one per entry of ``out_indices``, in that (increasing) order;
* the indices are timm's for ResNets: 0 is the stem after its activation (stride 2), 1-4 are the outputs of
  ``layer1``-``layer4`` (strides 4, 8, 16, 32). With BAM (Park et al., BMVC 2018) a stage's output is taken after its
  BAM module, as the classifier's next stage sees it. MobileNet v1 has the same five indices (strides 2-32), each the
  end of a stage, as timm's ``mobilenetv1_100``; the CIFAR networks have a stride-1 stem and
  stages at strides 1, 2 and 4 (CIFAR ResNet: indices 0-3; CIFAR-stem ResNets: 0-4 at strides 1, 1, 2, 4, 8);
* ``feature_info`` answers ``channels()``, ``reduction()`` and ``module_name()`` for the selected maps (or any index
  given), as timm's ``FeatureInfo`` does; ``in_channels_list`` is the list torchvision's ``FeaturePyramidNetwork``
  takes.

The feature network holds the classifier's own modules (no copy, as torchvision's ``IntermediateLayerGetter``) under
their own names, without the head (pooling, dropout, ``fc``) and without the stages after the last selected one, so
its state-dict keys are the classifier's minus those. A classifier's state dict therefore loads with::

    features.load_state_dict({k: v for k, v in state.items() if k in features.state_dict()})

(strict: every key of the feature network must be there). ``cbam.create_model(..., checkpoint=...,
features_only=True)`` loads the checkpoint into the classifier before cutting it. Adapters for torchvision's
detection and segmentation models are in :mod:`cbam.models.detection`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from .cifar import CifarResNet
from .mobilenet import MobileNetV1
from .resnet import ResNet

__all__ = ["FeatureInfo", "FeatureNet", "features_only", "supported_networks"]

# (module attribute, first, stop): the whole module when first is None, else its children first..stop-1 in order.
Step = tuple[str, int | None, int | None]


@dataclass(frozen=True)
class _Stage:
    """One feature map: the modules that compute it from the previous one, and what it is."""

    steps: tuple[Step, ...]
    channels: int
    reduction: int
    module: str


class FeatureInfo:
    """Channels, reduction (stride) and producing module of every feature map a network offers, timm's way.

    ``info`` lists all of them (``info[i]`` is a dict with ``num_chs``, ``reduction``, ``module``, ``index``);
    ``out_indices`` are the selected ones. Accessors without ``idx`` answer for the selected maps, in order; with an
    int or a list of ints, for those indices of ``info``.
    """

    def __init__(self, info: Sequence[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [{**d, "index": i} for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        def pick(i: int) -> dict[str, Any]:
            return dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channel counts (``num_chs``)."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Strides with respect to the input."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Names (in the classifier) of the modules whose outputs the feature maps are."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, channels={self.channels()}, reduction={self.reduction()})"


class FeatureNet(nn.Module):
    """A classifier's stem and stages, returning the feature maps ``out_indices`` select (build with
    :func:`features_only`). Attributes: ``feature_info``, ``out_indices``, ``in_channels_list``."""

    def __init__(self, model: nn.Module, stages: Sequence[_Stage], out_indices: Sequence[int]) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        kept = list(stages[: max(self.out_indices) + 1])
        ends: dict[str, int | None] = {}  # attribute -> how many children it needs (None: the whole module)
        for stage in kept:
            for name, _, stop in stage.steps:
                ends[name] = None if stop is None else max(stop, ends.get(name) or 0)
        for name, module in model.named_children():  # in the classifier's order, so the state dicts' orders agree
            if name in ends:
                stop = ends[name]
                self.add_module(name, module if stop is None else module[:stop])
        self._steps = [stage.steps for stage in kept]
        self._taken = frozenset(self.out_indices)
        info = [{"num_chs": s.channels, "reduction": s.reduction, "module": s.module} for s in stages]
        self.feature_info = FeatureInfo(info, self.out_indices)
        for attr in ("model_name", "attention", "model_kwargs", "attn_kwargs"):  # provenance, as create_model sets
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))
        self.train(model.training)

    @property
    def in_channels_list(self) -> list[int]:
        """Channels of the returned maps, in order: ``FeaturePyramidNetwork(features.in_channels_list, 256)``."""
        return list(self.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, steps in enumerate(self._steps):
            for name, first, stop in steps:
                module = getattr(self, name)
                if first is None:
                    x = module(x)
                else:
                    for child in range(first, stop):
                        x = module[child](x)
            if index in self._taken:
                features.append(x)
        return features


# ----------------------------------------------------------------------------------------------------------------------
# Where each supported network's feature maps are
# ----------------------------------------------------------------------------------------------------------------------
def _stride(module: nn.Module) -> int:
    stride = getattr(module, "stride", 1)
    return int(stride[0] if isinstance(stride, (tuple, list)) else stride)


def _block_stride(block: nn.Module) -> int:
    """A residual block's stride: its ``stride`` attribute (ResNet blocks) or its first conv's (CIFAR blocks)."""
    stride = getattr(block, "stride", None)
    return _stride(block.conv1) if stride is None else int(stride)


def _block_channels(block: nn.Module) -> int:
    """A residual block's output channels: those of its last BatchNorm (``bn3`` in a bottleneck, else ``bn2``)."""
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def _stage_end(model: nn.Module, layer: str, bam: str) -> tuple[tuple[Step, ...], str]:
    """The steps of a stage followed by its BAM slot when the network has one, and the producing module's name."""
    module = getattr(model, bam, None)
    if module is None:
        return ((layer, None, None),), layer
    return ((layer, None, None), (bam, None, None)), layer if isinstance(module, nn.Identity) else bam


def _resnet_stages(model: nn.Module) -> list[_Stage]:
    """This package's ResNet family (and torchvision's ResNet, same names): stem, then layer1-layer4 (+ bam1-bam3)."""
    reduction = _stride(model.conv1)
    stages = [_Stage((("conv1", None, None), ("bn1", None, None), ("relu", None, None)),
                     model.bn1.num_features, reduction, "relu")]
    reduction *= _stride(model.maxpool) if isinstance(model.maxpool, nn.MaxPool2d) else 1
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}")
        reduction *= _block_stride(layer[0])
        steps, produced = _stage_end(model, f"layer{i}", f"bam{i}")
        if i == 1:
            steps = (("maxpool", None, None), *steps)
        stages.append(_Stage(steps, _block_channels(layer[-1]), reduction, produced))
    return stages


def _cifar_stages(model: CifarResNet) -> list[_Stage]:
    """He et al.'s CIFAR ResNet: stem (stride 1), then layer1-layer3 (+ bam1, bam2)."""
    reduction = _stride(model.conv1)
    stages = [_Stage((("conv1", None, None), ("bn1", None, None), ("relu", None, None)),
                     model.bn1.num_features, reduction, "relu")]
    for i in range(1, 4):
        layer = getattr(model, f"layer{i}")
        reduction *= _block_stride(layer[0])
        steps, produced = _stage_end(model, f"layer{i}", f"bam{i}")
        stages.append(_Stage(steps, _block_channels(layer[-1]), reduction, produced))
    return stages


def _mobilenet_stages(model: MobileNetV1) -> list[_Stage]:
    """MobileNet v1: one map at the end of each resolution (the block before every stride-2 block, and the last)."""
    blocks = model.blocks
    ends = [i - 1 for i in range(1, len(blocks)) if _stride(blocks[i].conv_dw) > 1] + [len(blocks) - 1]
    stem: tuple[Step, ...] = tuple((n, None, None) for n in ("conv_stem", "bn_stem", "attn_stem", "act_stem"))
    reduction = _stride(model.conv_stem)
    stages, first = [], 0
    for k, end in enumerate(ends):
        reduction *= _stride(blocks[first].conv_dw)
        steps: tuple[Step, ...] = (("blocks", first, end + 1),)
        bam = getattr(model, f"bam{k + 1}", None)
        produced = f"blocks.{end}"
        if bam is not None:
            steps += ((f"bam{k + 1}", None, None),)
            produced = produced if isinstance(bam, nn.Identity) else f"bam{k + 1}"
        steps = (stem + steps) if k == 0 else steps
        stages.append(_Stage(steps, blocks[end].conv_pw.out_channels, reduction, produced))
        first = end + 1
    return stages


_PLANS = (
    (ResNet, _resnet_stages, "cbam.models.resnet.ResNet (resnet*, wide_resnet*, resnext*, *_cifar)"),
    (CifarResNet, _cifar_stages, "cbam.models.cifar.CifarResNet (cifar_resnet*)"),
    (MobileNetV1, _mobilenet_stages, "cbam.models.mobilenet.MobileNetV1 (mobilenet_v1)"),
    (torchvision.models.ResNet, _resnet_stages, "torchvision.models.ResNet"),
)


def supported_networks() -> list[str]:
    """The network classes :func:`features_only` knows, for messages and docs."""
    return [label for _, _, label in _PLANS]


def _check_out_indices(out_indices: Sequence[int] | None, count: int, name: str) -> tuple[int, ...]:
    """``out_indices`` as a tuple of increasing non-negative ints (negative ones count from the end, as in timm)."""
    if out_indices is None:
        return tuple(range(count))
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence):
        raise TypeError(f"out_indices must be a sequence of ints such as (1, 2, 3, 4), got {out_indices!r}")
    if not out_indices:
        raise ValueError(f"out_indices must name at least one of {name}'s feature maps 0-{count - 1}, got none")
    bad = [i for i in out_indices if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise TypeError(f"out_indices must be ints, got {bad[0]!r} ({type(bad[0]).__name__}) in {tuple(out_indices)}")
    outside = [i for i in out_indices if not -count <= i < count]
    if outside:
        given = tuple(out_indices)
        raise ValueError(f"out_indices: {name} has feature maps 0-{count - 1}, got {outside[0]} in {given}")
    resolved = tuple(i % count for i in out_indices)
    twice = sorted({i for i in resolved if resolved.count(i) > 1})
    if twice:
        raise ValueError(f"out_indices names feature map {twice[0]} twice: {tuple(out_indices)}")
    if list(resolved) != sorted(resolved):
        raise ValueError(f"out_indices must be in increasing order (shallow to deep), got {tuple(out_indices)}")
    return resolved


def features_only(model: nn.Module, out_indices: Sequence[int] | None = None) -> FeatureNet:
    """The feature network of ``model`` returning the maps ``out_indices`` selects (default: all; see the module
    docstring for the indices). It shares ``model``'s modules; the head and unused later stages are left out."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"features_only: expected an nn.Module, got {type(model).__name__}")
    for cls, plan, _ in _PLANS:
        if isinstance(model, cls):
            stages = plan(model)
            break
    else:
        raise TypeError(
            f"features_only: no feature maps known for {type(model).__name__}; supported: "
            f"{'; '.join(supported_networks())}"
        )
    name = getattr(model, "model_name", type(model).__name__)
    return FeatureNet(model, stages, _check_out_indices(out_indices, len(stages), name))
