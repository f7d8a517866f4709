"""String-or-class factory: "with or without attention" is one keyword (``attention="cbam"``)."""

from __future__ import annotations

from torch import nn

from .bam import BAM
from .cbam import CBAM
from .se import SE

ATTENTION_TYPES: dict[str, type[nn.Module]] = {"se": SE, "cbam": CBAM, "bam": BAM}


def get_attn(attention: str | type[nn.Module] | None) -> type[nn.Module] | None:
    """Resolve ``None``/"none", "se", "cbam", "bam" or an nn.Module class to a class (or None)."""
    if attention is None or (isinstance(attention, str) and attention.lower() == "none"):
        return None
    if isinstance(attention, str):
        key = attention.lower()
        if key not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention {attention!r}; expected one of none, {', '.join(ATTENTION_TYPES)}")
        return ATTENTION_TYPES[key]
    if isinstance(attention, type) and issubclass(attention, nn.Module):
        return attention
    raise TypeError(f"attention must be None, a name or an nn.Module class, got {attention!r}")


def create_attn(attention: str | type[nn.Module] | None, channels: int, **kwargs) -> nn.Module | None:
    """Build the attention module for ``channels`` channels, or None when ``attention`` is None."""
    cls = get_attn(attention)
    return None if cls is None else cls(channels, **kwargs)


def attention_name(attention: str | type[nn.Module] | None) -> str:
    """Canonical lower-case name ("none", "se", "cbam", "bam" or the class name)."""
    cls = get_attn(attention)
    if cls is None:
        return "none"
    for key, value in ATTENTION_TYPES.items():
        if value is cls:
            return key
    return cls.__name__
