"""Command-line options shared by the subcommands that build a model (profile, train, ablate)."""

from __future__ import annotations

import argparse
from typing import Any

from .layers import ARRANGEMENTS, POOL_TYPES, PRESETS

ATTENTION_CHOICES = ("none", "se", "cbam", "bam")

# flag dest -> create_model keyword (only passed when given)
ATTENTION_OPTIONS = {
    "reduction": "reduction",
    "kernel_size": "kernel_size",
    "arrangement": "arrangement",
    "preset": "preset",
    "pool_types": "pool_types",
    "spatial_compress": "spatial_compress",
    "spatial": "spatial",
}
MODEL_OPTIONS = {"widen": "widen", "width_mult": "width_mult", "stride_in_1x1": "stride_in_1x1", "in_chans": "in_chans"}


def add_model_arguments(parser: argparse.ArgumentParser, *, default=None) -> None:
    """--attention plus the network and attention options of ``create_model``; unset means 'default'."""
    d = default
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default=d, help="attention module (default none)")
    g = parser.add_argument_group("attention options (create_model keywords)")
    g.add_argument("--reduction", type=int, default=d, help="MLP reduction ratio r (default 16)")
    g.add_argument("--kernel-size", type=int, default=d, help="spatial conv kernel size (default 7)")
    g.add_argument("--arrangement", choices=ARRANGEMENTS, default=d, help="order of the gates")
    g.add_argument("--preset", choices=tuple(PRESETS), default=d, help="paper (default), seed or timm")
    g.add_argument("--pool-types", type=_pool_list, default=d, help="channel pools, e.g. avg,max (default)")
    g.add_argument("--spatial-compress", choices=("pool", "conv"), default=d, help="spatial compression")
    g.add_argument("--no-spatial", dest="spatial", action="store_const", const=False, default=d,
                   help="channel gate only")
    n = parser.add_argument_group("network options")
    n.add_argument("--widen", type=float, default=d, help="wide_resnet18 width factor (1.5 or 2.0)")
    n.add_argument("--width-mult", type=float, default=d, help="mobilenet_v1 width multiplier (1.0 or 0.7)")
    n.add_argument("--stride-in-1x1", action="store_const", const=True, default=d,
                   help="ResNet v1 layout: stride on the first 1x1 conv of bottlenecks")
    n.add_argument("--in-chans", type=int, default=d, help="input channels (1 for grey-scale)")


def _pool_list(text: str) -> tuple[str, ...]:
    pools = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in pools if p not in POOL_TYPES]
    if not pools or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(POOL_TYPES)}, got {text!r}")
    return pools


def model_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """create_model keywords from parsed options (a namespace's vars or a config dict); unset ones left out."""
    out = {}
    for src, dst in {**ATTENTION_OPTIONS, **MODEL_OPTIONS}.items():
        if values.get(src) is not None:
            out[dst] = tuple(values[src]) if dst == "pool_types" else values[src]
    return out


def attention_arg(value: str | None) -> str | None:
    return None if value in (None, "none") else value
