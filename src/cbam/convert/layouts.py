"""Key layouts of the CBAM ResNets published elsewhere, and their renaming into this package's keys.

This package's key of a block's module is ``layerL.i.attn.<...>``; the rest of a ResNet (stem, convolutions,
BatchNorms, shortcut, head) has torchvision's keys in every layout here, so only the attention keys are renamed:

* the authors' release: ``layerL.i.cbam.ChannelGate.mlp.{1,3}.*`` (an ``nn.Sequential`` whose 0 is a Flatten and 2
  a ReLU), ``cbam.SpatialGate.spatial.conv.weight`` whose two input channels are [max; mean] (ours are [mean; max]:
  the two slices are swapped) and ``cbam.SpatialGate.spatial.bn.*``;
* timm's ``CbamModule`` in the block slot ``se``: ``se.channel.fc{1,2}.weight`` as 1 x 1 convolutions
  [out, in, 1, 1] (flattened to Linear weights), ``se.spatial.conv.conv.weight`` ([mean; max], as ours) and
  ``se.spatial.conv.bn.*``;
* torchvision's plain ResNet: no attention keys at all.

Ultralytics' ``CBAM`` module is mapped on its own (its networks are not ResNets): ``channel_attention.fc`` (a biased
1 x 1 convolution C -> C) is this package's ``channel.fc1`` of the ``"ultralytics"`` preset, ``spatial_attention.cv1``
its ``spatial.conv``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

__all__ = [
    "FORMATS",
    "LAYOUT_NAMES",
    "cbam_to_ultralytics",
    "detect_layout",
    "to_cbam_layout",
    "ultralytics_to_cbam",
]

#: the formats :func:`cbam.convert.load_into` reads, by the name it returns
FORMATS = ("cbam", "release", "timm", "torchvision")
LAYOUT_NAMES = {
    "cbam": "this package's",
    "release": "the authors' release",
    "timm": "timm's CBAM ResNet",
    "torchvision": "torchvision's plain ResNet",
}

Rule = tuple[re.Pattern[str], str, Callable[[str, torch.Tensor], torch.Tensor] | None]


def _swap_max_mean(key: str, weight: torch.Tensor) -> torch.Tensor:
    """The release's spatial conv reads [max; mean]; this package's reads [mean; max]: swap the input slices."""
    if weight.dim() != 4 or weight.shape[1] != 2:
        raise ValueError(f"{key}: expected the spatial conv weight [1, 2, k, k], got {list(weight.shape)}")
    return weight[:, [1, 0]].contiguous()


def _conv1x1_to_linear(key: str, weight: torch.Tensor) -> torch.Tensor:
    """A 1 x 1 convolution's weight [out, in, 1, 1] as a Linear weight [out, in]."""
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.flatten(1)
    if weight.dim() == 2:
        return weight
    raise ValueError(f"{key}: expected a 1 x 1 convolution weight [out, in, 1, 1], got {list(weight.shape)}")


def _weight_only(fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    return lambda key, t: fn(key, t) if key.endswith(".weight") else t


_RELEASE: list[Rule] = [
    (re.compile(r"^(.+)\.cbam\.ChannelGate\.mlp\.1\.(weight|bias)$"), r"\1.attn.channel.fc1.\2", None),
    (re.compile(r"^(.+)\.cbam\.ChannelGate\.mlp\.3\.(weight|bias)$"), r"\1.attn.channel.fc2.\2", None),
    (re.compile(r"^(.+)\.cbam\.SpatialGate\.spatial\.conv\.(weight|bias)$"), r"\1.attn.spatial.conv.\2",
     _weight_only(_swap_max_mean)),
    (re.compile(r"^(.+)\.cbam\.SpatialGate\.spatial\.bn\.(\w+)$"), r"\1.attn.spatial.norm.\2", None),
]
_TIMM: list[Rule] = [
    (re.compile(r"^(.+)\.se\.channel\.fc([12])\.(weight|bias)$"), r"\1.attn.channel.fc\2.\3",
     _weight_only(_conv1x1_to_linear)),
    (re.compile(r"^(.+)\.se\.spatial\.conv\.conv\.weight$"), r"\1.attn.spatial.conv.weight", None),
    (re.compile(r"^(.+)\.se\.spatial\.conv\.bn\.(\w+)$"), r"\1.attn.spatial.norm.\2", None),
]
# keys that belong to the layout's attention module: one that no rule renames is refused, not passed on
_OWNED = {"release": re.compile(r"\.cbam\."), "timm": re.compile(r"\.se\.")}
_RULES = {"release": _RELEASE, "timm": _TIMM}


def detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """The layout of a ResNet state dict (keys without ``module.``), one of :data:`FORMATS`, or None if unknown.

    Attention keys decide (``.cbam.ChannelGate.`` / ``.cbam.SpatialGate.``: the release; ``.se.channel.fc1.`` /
    ``.se.spatial.conv.conv.``: timm; ``.attn.`` or ``bamN.``: this package); without any, a state dict with a
    ResNet's stem, ``layer1`` and ``fc`` is torchvision's plain ResNet (timm's plain ResNets have the same keys)."""
    keys = list(state)
    if any(".cbam.ChannelGate." in k or ".cbam.SpatialGate." in k for k in keys):
        return "release"
    if any(".se.channel.fc1." in k or ".se.spatial.conv.conv." in k for k in keys):
        return "timm"
    if any(".attn." in k or re.match(r"bam\d\.", k) for k in keys):
        return "cbam"
    if "conv1.weight" in state and "fc.weight" in state and any(k.startswith("layer1.0.") for k in keys):
        return "torchvision"
    return None


def to_cbam_layout(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """``state`` (in ``layout``) with this package's keys and tensor layouts; nothing else is changed or added."""
    if layout not in FORMATS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {', '.join(FORMATS)}")
    rules = _RULES.get(layout)
    if rules is None:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for pattern, target, transform in rules:
            if pattern.match(key):
                key_out = pattern.sub(target, key)
                tensor = tensor if transform is None else transform(key, tensor)
                break
        else:
            if _OWNED[layout].search(key):
                raise ValueError(f"{key}: not a key of {LAYOUT_NAMES[layout]} CBAM module this package can convert")
            key_out = key
        out[key_out] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Ultralytics' CBAM module <-> this package's CBAM(preset="ultralytics")
# ----------------------------------------------------------------------------------------------------------------------
_UL_FC = re.compile(r"^(.*)channel_attention\.fc\.(weight|bias)$")
_UL_CONV = re.compile(r"^(.*)spatial_attention\.cv1\.weight$")
_OURS_FC1 = re.compile(r"^(.*)channel\.fc1\.(weight|bias)$")
_OURS_CONV = re.compile(r"^(.*)spatial\.conv\.weight$")


def ultralytics_to_cbam(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of Ultralytics' CBAM modules (``<prefix>channel_attention.fc.weight`` [C, C, 1, 1], ``.bias`` [C],
    ``<prefix>spatial_attention.cv1.weight`` [1, 2, k, k]) renamed to those of ``CBAM(C, preset="ultralytics")``
    (``<prefix>channel.fc1.weight`` [C, C], ``.bias``, ``<prefix>spatial.conv.weight``); other keys pass unchanged,
    so a whole network's state dict can be mapped. Both read the spatial maps as [mean; max]: no swap."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := _UL_FC.match(key):
            if m.group(2) == "weight":
                tensor = _square_conv1x1(key, tensor)
            out[f"{m.group(1)}channel.fc1.{m.group(2)}"] = tensor
        elif m := _UL_CONV.match(key):
            out[f"{m.group(1)}spatial.conv.weight"] = tensor
        else:
            out[key] = tensor
    return out


def cbam_to_ultralytics(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`ultralytics_to_cbam`: every ``CBAM(preset="ultralytics")`` (found by its
    ``<prefix>channel.fc1.weight``) back to Ultralytics' keys. A CBAM that Ultralytics' module cannot hold (a second
    MLP layer, a spatial norm or bias, no MLP bias) is a ValueError naming its key."""
    prefixes = [m.group(1) for k in state if (m := _OURS_FC1.match(k)) and m.group(2) == "weight"]
    out = dict(state)
    for p in prefixes:
        extra = sorted(k for k in state if k.startswith(p) and re.match(r"channel\.fc2\.|spatial\.(norm\.|conv\.bias)",
                                                                       k[len(p):]))
        if extra:
            raise ValueError(f"{extra[0]}: Ultralytics' CBAM has one channel layer and a bias-free spatial conv "
                             "without norm; expected a CBAM of preset 'ultralytics'")
        for name in ("channel.fc1.bias", "spatial.conv.weight"):
            if p + name not in state:
                raise ValueError(f"{p}{name} is missing: Ultralytics' CBAM has it; expected a CBAM of preset "
                                 "'ultralytics'")
        weight = out.pop(p + "channel.fc1.weight")
        if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"{p}channel.fc1.weight: expected a square [C, C] weight, got {list(weight.shape)}")
        out[p + "channel_attention.fc.weight"] = weight[:, :, None, None]
        out[p + "channel_attention.fc.bias"] = out.pop(p + "channel.fc1.bias")
        out[p + "spatial_attention.cv1.weight"] = out.pop(p + "spatial.conv.weight")
    return out


def _square_conv1x1(key: str, weight: torch.Tensor) -> torch.Tensor:
    weight = _conv1x1_to_linear(key, weight)
    if weight.shape[0] != weight.shape[1]:
        raise ValueError(f"{key}: expected a C -> C weight [C, C, 1, 1], got {list(weight.shape)}")
    return weight
