"""CBAM: Convolutional Block Attention Module.

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018 (arXiv 1807.06521).

A channel gate ("what") then a spatial gate ("where") refine a feature map:
``F' = sigmoid(Mc(F)) * F`` and ``F'' = sigmoid(Ms(F')) * F'``, where ``Mc`` is a shared MLP applied
to pooled channel descriptors (avg and max over H x W, outputs summed) and ``Ms`` is a k x k convolution
over the [avg; max] maps pooled across channels.

The defaults reproduce the authors' reference release, which produced the paper's numbers (ResNet-50 +
CBAM: 22.66 % top-1 error on ImageNet-1K, against 24.56 % plain and 23.14 % with SE). Where the release
differs from the paper's text we follow the release and say so:

* the spatial convolution has no bias and is followed by ``BatchNorm2d(1, momentum=0.01)`` whose weight
  and bias both start at 0, so the spatial gate starts at exactly 0.5;
* the spatial pooling order here is the paper's [avg; max] (input channel 0 = average). The release
  stacks [max; avg]; checkpoint conversion swaps the two input slices of the 7 x 7 weight.

Presets give the exact behaviour of other popular implementations: ``"paper"`` (the above), ``"seed"``
(the TensorFlow 1 snippet this project started from: hidden width C/2, biased dense layers, biased 7 x 7
conv, no normalisation), ``"timm"`` (timm's ``CbamModule``: MLP without biases, hidden width
round(C/16), BN momentum 0.1 with weight 1) and ``"ultralytics"`` (Ultralytics' ``CBAM``: the channel gate is one
biased C -> C layer on the average pool only, no hidden layer; the spatial conv has no bias and no normalisation;
stored as ``channel.fc1`` with ``channel.fc2 = None``). Every ablation of the paper is one keyword away: channel pool
types, spatial compression by pooling or a learned 1 x 1 conv, kernel size, and the arrangement of the
two gates (``channel_first``, ``spatial_first``, ``parallel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_feature_map, check_odd_kernel, check_positive_int, make_act, make_gate
from .dispatch import kernel_for

POOL_TYPES = ("avg", "max", "lp", "lse")
ARRANGEMENTS = ("channel_first", "spatial_first", "parallel")
SPATIAL_COMPRESSIONS = ("pool", "conv")


# --------------------------------------------------------------------------------------------------
# Presets: the defaults of each known implementation. Explicit keyword arguments override them.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    reduction: int
    hidden_rounding: str  # "floor": C // r (release); "round": max(1, round(C / r)) (timm); "ratio": seed
    mlp_bias: bool
    spatial_bias: bool
    spatial_norm: bool
    bn_momentum: float
    init: str  # "release", "seed" or "torch"
    channel_layers: int = 2  # 1: a single C -> C layer (fc1), no hidden layer, fc2 is None (Ultralytics)
    pool_types: tuple[str, ...] = ("avg", "max")


PRESETS: dict[str, Preset] = {
    "paper": Preset(16, "floor", True, False, True, 0.01, "release"),
    "seed": Preset(2, "floor", True, True, False, 0.01, "seed"),
    "timm": Preset(16, "round", False, False, True, 0.1, "torch"),
    # Ultralytics' CBAM: sigmoid(conv1x1_C->C(avgpool(x))) then a bias-free k x k conv over [mean; max], no norm.
    "ultralytics": Preset(1, "floor", True, False, False, 0.01, "torch", channel_layers=1, pool_types=("avg",)),
}


def hidden_width(module: str, channels: int, reduction: int, rounding: str = "floor") -> int:
    """Hidden units of the channel MLP: C // r as in the release (timm rounds to nearest, minimum 1)."""
    check_positive_int(module, "reduction", reduction)
    hidden = max(1, int(channels / reduction + 0.5)) if rounding == "round" else channels // reduction
    if hidden < 1:
        raise ValueError(
            f"{module}: reduction {reduction} leaves no hidden unit for {channels} channels; "
            f"expected reduction <= {channels} or an explicit hidden width"
        )
    return hidden


def pool_channels(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """Pool an (N, C, H, W) map over H x W into (N, C) with one of the release's four pool types."""
    if pool_type == "avg":
        return x.mean(dim=(2, 3))
    if pool_type == "max":
        return x.amax(dim=(2, 3))
    if pool_type == "lp":  # the release's LP pool: p = 2 and a sum, not a mean, i.e. the L2 norm
        return torch.linalg.vector_norm(x, ord=2, dim=(2, 3))
    if pool_type == "lse":  # numerically stable log-sum-exp over H x W
        return torch.logsumexp(x, dim=(2, 3))
    raise ValueError(f"unknown pool type {pool_type!r}; expected one of {POOL_TYPES}")


class ChannelGate(nn.Module):
    """Channel attention: a shared MLP over pooled H x W descriptors, outputs summed, then a gate.

    Parameters are ``fc1`` (C -> hidden) and ``fc2`` (hidden -> C), stored as ``nn.Linear`` weights of
    shape [hidden, C] and [C, hidden]. With ``layers=1`` (Ultralytics' form) the gate is the single layer ``fc1``
    (C -> C, hidden = C, no activation) and ``fc2`` is None.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        hidden: int | None = None,
        pool_types: Sequence[str] = ("avg", "max"),
        bias: bool = True,
        act_layer: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
        hidden_rounding: str = "floor",
        layers: int = 2,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        if layers not in (1, 2) or isinstance(layers, bool):
            raise ValueError(f"{name}: layers must be 1 (one C -> C layer) or 2 (the MLP), got {layers!r}")
        if isinstance(pool_types, str):
            pool_types = (pool_types,)
        pool_types = tuple(pool_types)
        if not pool_types:
            raise ValueError(f"{name}: pool_types must be a non-empty subset of {POOL_TYPES}, got ()")
        for p in pool_types:
            check_choice(name, "pool type", p, POOL_TYPES)
        if len(set(pool_types)) != len(pool_types):
            raise ValueError(f"{name}: pool_types must not repeat a pool type, got {pool_types}")
        self.pool_types = pool_types
        if layers == 1:
            if hidden not in (None, channels):
                raise ValueError(f"{name}: a single-layer gate maps {channels} channels to {channels}, "
                                 f"got hidden={hidden}")
            hidden = channels
        elif hidden is None:
            hidden = hidden_width(name, channels, reduction, hidden_rounding)
        self.hidden = check_positive_int(name, "hidden", hidden)
        self.fc1 = nn.Linear(channels, self.hidden, bias=bias)
        self.act = make_act(name, act_layer) if layers == 2 else nn.Identity()
        self.fc2 = nn.Linear(self.hidden, channels, bias=bias) if layers == 2 else None
        self.gate = make_gate(name, gate)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-gate channel attention, shape (N, C, 1, 1)."""
        pooled = torch.stack([pool_channels(x, p) for p in self.pool_types])  # (P, N, C), one MLP call
        out = self.fc1(pooled)
        if self.fc2 is not None:
            out = self.fc2(self.act(out))
        return out.sum(dim=0)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, self.channels)
        return x * self.gate(self.logits(x))

    def extra_repr(self) -> str:
        return f"pool_types={self.pool_types}"


class SpatialGate(nn.Module):
    """Spatial attention: compress channels to [avg; max] maps (or a learned 1 x 1 conv), k x k conv, gate.

    ``conv.weight`` has shape [1, 2, k, k]; input channel 0 is the channel average, 1 the channel max.
    With ``norm=True`` a ``BatchNorm2d(1)`` (``norm``) follows the convolution, as in the release.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        compress: str = "pool",
        bias: bool = False,
        norm: bool = True,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.kernel_size = check_odd_kernel(name, kernel_size)
        self.compress_mode = check_choice(name, "spatial compression", compress, SPATIAL_COMPRESSIONS)
        if compress == "conv":
            self.compress = nn.Conv2d(channels, 1, 1, bias=False)
        in_maps = 2 if compress == "pool" else 1
        self.conv = nn.Conv2d(in_maps, 1, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = nn.BatchNorm2d(1, eps=bn_eps, momentum=bn_momentum) if norm else None
        self.gate = make_gate(name, gate)

    def compressed(self, x: torch.Tensor) -> torch.Tensor:
        """The maps the k x k conv sees: (N, 2, H, W) = [mean over C; max over C], or the 1 x 1 conv."""
        if self.compress_mode == "pool":
            return torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return self.compress(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-gate spatial attention, shape (N, 1, H, W)."""
        s = self.conv(self.compressed(x))
        if self.norm is not None:
            s = self._normalise(s)
        return s

    def _normalise(self, s: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        # BatchNorm cannot take batch statistics of a single value (batch 1 at 1 x 1): use running stats.
        use_batch_stats = self.training and s.shape[0] * s.shape[2] * s.shape[3] > 1
        if use_batch_stats:
            return norm(s)
        return F.batch_norm(s, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, self.channels)
        return x * self.gate(self.logits(x))

    def extra_repr(self) -> str:
        return f"compress={self.compress_mode!r}"


def preset_options(
    name: str,
    p: Preset,
    preset: str,
    channels: int | None,
    *,
    reduction: int | None,
    hidden: int | None,
    pool_types: Sequence[str] | None,
    spatial: bool,
    arrangement: str,
    mlp_bias: bool | None,
    spatial_bias: bool | None,
    spatial_norm: bool | None,
    bn_momentum: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A CBAM's options checked against each other and the preset ``p``, unset ones taken from it: the keyword
    arguments of its channel gate and of its spatial gate. Shared with ``cbam.keras.CBAM``, so both check and
    resolve alike; ``channels`` may be None there (read from the input later)."""
    check_choice(name, "arrangement", arrangement, ARRANGEMENTS)
    if arrangement != "channel_first" and not spatial:
        raise ValueError(f"{name}: arrangement {arrangement!r} needs the spatial gate, got spatial=False")
    if p.channel_layers == 1 and (
        reduction not in (None, p.reduction) or hidden not in (None, hidden if channels is None else channels)
    ):
        given = f"reduction={reduction}" if reduction not in (None, p.reduction) else f"hidden={hidden}"
        c = "C" if channels is None else channels
        raise ValueError(
            f"{name}: preset {preset!r} has one {c} -> {c} channel layer and no reduction; "
            f"expected reduction and hidden unset, got {given}"
        )
    channel = {
        "reduction": p.reduction if reduction is None else reduction,
        "hidden": hidden,
        "pool_types": p.pool_types if pool_types is None else pool_types,
        "bias": p.mlp_bias if mlp_bias is None else mlp_bias,
        "hidden_rounding": p.hidden_rounding,
        "layers": p.channel_layers,
    }
    spatial_options = {
        "bias": p.spatial_bias if spatial_bias is None else spatial_bias,
        "norm": p.spatial_norm if spatial_norm is None else spatial_norm,
        "bn_momentum": p.bn_momentum if bn_momentum is None else bn_momentum,
    }
    return channel, spatial_options


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate (``channel``) then spatial gate (``spatial``).

    Args:
        channels: channels C of the feature map.
        reduction: MLP reduction ratio r (hidden = C // r); ``hidden`` sets the width explicitly.
        preset: ``"paper"`` (the authors' release, default), ``"seed"``, ``"timm"`` or ``"ultralytics"``; explicit
            keyword arguments override the preset's values (``"ultralytics"`` has no reduction: its channel gate is
            one C -> C layer, so ``reduction`` and ``hidden`` must stay unset).
        pool_types: any non-empty subset of ``("avg", "max", "lp", "lse")`` for the channel gate (default: the
            preset's, ``("avg", "max")``; ``("avg",)`` for ``"ultralytics"``).
        spatial: ``False`` keeps the channel gate only (the paper's "channel only" ablation).
        spatial_compress: ``"pool"`` ([avg; max] over C) or ``"conv"`` (a learned 1 x 1 conv to one map).
        kernel_size: odd size of the spatial convolution (the paper uses 7; its ablation also 3).
        arrangement: ``"channel_first"`` (paper), ``"spatial_first"``, or ``"parallel"`` (both gates from
            the same input, applied as one sigmoid of the summed logits).
        spatial_norm, spatial_bias, mlp_bias, bn_momentum: the details the implementations disagree on.
        act_layer: hidden activation of the MLP; gate: ``"sigmoid"`` (paper), ``"hard_sigmoid"`` or a class.

    The constructor takes only what defines the function. How it is computed is decided per call by the input's
    device (``cbam.layers.dispatch``): on the CPU the fused kernels of ``cbam.fused`` where they serve the
    configuration and dtype (built on the first CPU call), the reference path (:meth:`forward_reference`) elsewhere.
    Both give the same numbers; ``with cbam.layers.reference_only():`` forces the reference path.
    """

    def __init__(
        self,
        channels: int,
        reduction: int | None = None,
        *,
        preset: str = "paper",
        hidden: int | None = None,
        pool_types: Sequence[str] | None = None,
        spatial: bool = True,
        spatial_compress: str = "pool",
        kernel_size: int = 7,
        arrangement: str = "channel_first",
        spatial_norm: bool | None = None,
        spatial_bias: bool | None = None,
        mlp_bias: bool | None = None,
        bn_momentum: float | None = None,
        act_layer: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        p = PRESETS[check_choice(name, "preset", preset, tuple(PRESETS))]
        self.preset = preset
        self.channels = check_positive_int(name, "channels", channels)
        self.arrangement = arrangement
        channel_options, spatial_options = preset_options(
            name, p, preset, channels, reduction=reduction, hidden=hidden, pool_types=pool_types, spatial=spatial,
            arrangement=arrangement, mlp_bias=mlp_bias, spatial_bias=spatial_bias, spatial_norm=spatial_norm,
            bn_momentum=bn_momentum,
        )
        self.channel = ChannelGate(channels, act_layer=act_layer, gate=gate, **channel_options)
        self.spatial = (
            SpatialGate(channels, kernel_size, compress=spatial_compress, gate=gate, **spatial_options)
            if spatial
            else None
        )
        self.gate = make_gate(name, gate)
        self.reset_parameters(p.init)

    @torch.no_grad()
    def reset_parameters(self, init: str | None = None) -> None:
        """Initialise as the chosen implementation does (None: as the module's preset does).

        ``release``: spatial conv kaiming-normal (fan_out), MLP weights PyTorch's default, every bias 0,
        spatial BN weight and bias 0 (gate starts at 0.5). ``seed``: Glorot-uniform weights and zero biases
        (TensorFlow's defaults). ``torch``: PyTorch's defaults (what timm's module gets).
        """
        if init is None:
            init = PRESETS[self.preset].init
        modules = [m for m in (self.channel.fc1, self.channel.fc2) if m is not None]
        if self.spatial is not None:
            modules += [self.spatial.conv] + ([self.spatial.compress] if self.spatial.compress_mode == "conv" else [])
        for m in modules:
            m.reset_parameters()
            if init == "seed":
                nn.init.xavier_uniform_(m.weight)
            if init in ("release", "seed") and m.bias is not None:
                nn.init.zeros_(m.bias)
        norm = None if self.spatial is None else self.spatial.norm
        if init == "release" and self.spatial is not None:
            nn.init.kaiming_normal_(self.spatial.conv.weight, mode="fan_out", nonlinearity="relu")
            if self.spatial.compress_mode == "conv":
                nn.init.kaiming_normal_(self.spatial.compress.weight, mode="fan_out", nonlinearity="relu")
        if norm is not None:
            norm.reset_parameters()
            if init == "release":
                nn.init.zeros_(norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, self.channels)
        kernel = kernel_for(x)
        if kernel is not None:
            out = kernel(self, x)
            if out is not None:
                return out
        return self._reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The readable path, composed of the two gates; every kernel is tested against it."""
        check_feature_map(type(self).__name__, x, self.channels)
        return self._reference(x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is None:
            return x * self.channel.gate(self.channel.logits(x))
        if self.arrangement == "channel_first":
            x = x * self.channel.gate(self.channel.logits(x))
            return x * self.spatial.gate(self.spatial.logits(x))
        if self.arrangement == "spatial_first":
            x = x * self.spatial.gate(self.spatial.logits(x))
            return x * self.channel.gate(self.channel.logits(x))
        return x * self.gate(self.channel.logits(x) + self.spatial.logits(x))

    def extra_repr(self) -> str:
        return f"{self.channels}, preset={self.preset!r}, arrangement={self.arrangement!r}"
