"""Attention modules: CBAM and its gates, the SE and BAM modules the paper compares with, and CBAM's dispatch."""

from .bam import BAM
from .cbam import ARRANGEMENTS, CBAM, POOL_TYPES, PRESETS, ChannelGate, SpatialGate
from .create_attn import ATTENTION_TYPES, attention_name, create_attn, get_attn
from .dispatch import reference_only, register_kernel
from .se import SE

__all__ = [
    "ARRANGEMENTS",
    "ATTENTION_TYPES",
    "BAM",
    "CBAM",
    "POOL_TYPES",
    "PRESETS",
    "SE",
    "ChannelGate",
    "SpatialGate",
    "attention_name",
    "create_attn",
    "get_attn",
    "reference_only",
    "register_kernel",
]
