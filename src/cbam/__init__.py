"""cbam: the Convolutional Block Attention Module (Woo et al., ECCV 2018) for PyTorch."""

from .factory import create_model
from .fused import fuse, unfuse
from .insertion import Placement, init_attention, insert, load_base_weights, register_placement
from .layers import BAM, CBAM, SE, ChannelGate, SpatialGate, create_attn, get_attn
from .models import list_models, register_model
from .viz import record

__version__ = "0.1.0"

__all__ = [
    "BAM",
    "CBAM",
    "SE",
    "ChannelGate",
    "SpatialGate",
    "create_attn",
    "create_model",
    "fuse",
    "get_attn",
    "init_attention",
    "insert",
    "load_base_weights",
    "Placement",
    "register_placement",
    "list_models",
    "record",
    "register_model",
    "unfuse",
]
