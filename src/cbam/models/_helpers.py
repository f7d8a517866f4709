"""Pieces the CBAM paper's networks share: building attention modules and initialising the rest."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..layers import BAM, PRESETS, create_attn, get_attn

AttnArg = str | type[nn.Module] | None  # None / "none", "se", "cbam", "bam" or an nn.Module class


def resolve_attention(attention: AttnArg) -> tuple[type[nn.Module] | None, bool]:
    """``(class, at_stage_ends)``: BAM sits between stages (its paper's "bottlenecks"), others in blocks."""
    cls = get_attn(attention)
    return cls, cls is not None and issubclass(cls, BAM)


def make_attn(
    attn_cls: type[nn.Module] | None,
    channels: int,
    attn_kwargs: dict[str, Any] | None,
    hidden_rounding: str = "floor",
) -> nn.Module:
    """The attention module for ``channels`` channels, or ``nn.Identity`` (no state-dict keys) when None.

    ``hidden_rounding`` decides the MLP width when no explicit ``hidden`` is given: ``"floor"`` is
    C // r (the modules' own rule, the authors' release), ``"round"`` is C / r rounded to nearest (what
    reproduces CBAM Table 5 for MobileNet at width 0.7, whose channel counts are not multiples of 16).
    Either way at least one hidden unit is used, so thin networks do not fail.
    """
    if attn_cls is None:
        return nn.Identity()
    if hidden_rounding not in ("floor", "round"):
        raise ValueError(f"hidden_rounding must be 'floor' or 'round', got {hidden_rounding!r}")
    kwargs = dict(attn_kwargs or {})
    params = inspect.signature(attn_cls).parameters
    if "hidden" in params and "reduction" in params and kwargs.get("hidden") is None:
        reduction = kwargs.get("reduction", params["reduction"].default)
        if reduction is None:  # CBAM: the preset decides
            preset = kwargs.get("preset", "paper")
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(map(repr, PRESETS))}")
            reduction = PRESETS[preset].reduction
        if isinstance(reduction, int) and not isinstance(reduction, bool) and reduction > 0:
            hidden = channels // reduction if hidden_rounding == "floor" else int(channels / reduction + 0.5)
            hidden = max(1, hidden)
            if hidden != channels // reduction:
                kwargs["hidden"] = hidden
    module = create_attn(attn_cls, channels, **kwargs)
    assert module is not None
    return module


def init_weights(module: nn.Module, skip: tuple[type[nn.Module], ...] = ()) -> None:
    """Initialise as the CBAM authors' release does, leaving attention modules (``skip``) untouched.

    Convs: kaiming-normal, fan_out, ReLU gain; BatchNorm: weight 1, bias 0; Linear: bias 0 (weight keeps
    PyTorch's default). The attention modules initialise themselves (CBAM's spatial BN starts at weight 0,
    so its gate starts at 0.5); re-initialising them here would silently change that.
    """
    for child in module.children():
        if skip and isinstance(child, skip):
            continue
        if isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            if child.weight is not None:
                nn.init.ones_(child.weight)
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.Linear):
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        else:
            init_weights(child, skip)
