"""Options shared by the subcommands that build a model (profile, train, demo, ablate), with one help text each.

The help of every flag says what it does, its default and its unit, so that ``cbam <command> --help`` is the
reference. ``train`` builds its flags from :class:`~cbam.train.config.TrainConfig` and takes the texts of the
model options from :data:`MODEL_HELP`, so the two commands describe an option the same way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from ..layers import ARRANGEMENTS, ATTENTION_TYPES, POOL_TYPES, PRESETS

ATTENTION_CHOICES = ("none", *ATTENTION_TYPES)

# option (dest) -> help, default included (the flags leave unset options to the model, so the default is the model's)
MODEL_HELP = {
    "attention": "attention module in every block (default: none)",
    "reduction": "channel-MLP reduction ratio r: hidden units = channels / r (default: the preset's, 16 for paper)",
    "kernel_size": "side of the spatial gate's convolution, in pixels (default: 7)",
    "arrangement": "order of the channel and spatial gates (default: channel_first, as in the paper)",
    "preset": "CBAM's small details (biases, norm, init) as in the paper's release, its seed code, timm or "
              "Ultralytics (default: paper)",
    "pool_types": f"channel-gate pools, comma-separated subset of {','.join(POOL_TYPES)} "
                  "(default: the preset's, avg,max; avg for ultralytics)",
    "spatial_compress": "how the spatial gate compresses channels: pool (avg & max) or conv (1x1) (default: pool)",
    "spatial": "the spatial gate; --no-spatial keeps the channel gate only (default: on)",
    "widen": "width factor of wide_resnet18, e.g. 1.5 or 2.0 (default: the model's)",
    "width_mult": "width multiplier of mobilenet_v1, e.g. 1.0 or 0.7 (default: the model's, 1.0)",
    "stride_in_1x1": "ResNet v1 layout: stride on the first 1x1 conv of bottlenecks (default: off, v1.5 layout)",
    "in_chans": "input image channels, e.g. 1 for grey-scale (default: 3, in training the data set's)",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--attention plus the network and attention options of ``create_model``; an unset option stays unset (None)."""
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default=None, help=MODEL_HELP["attention"])
    g = parser.add_argument_group("attention options (create_model keywords)")
    g.add_argument("--reduction", type=at_least(1, 4096), default=None, help=MODEL_HELP["reduction"])
    g.add_argument("--kernel-size", type=at_least(1, 255), default=None, help=MODEL_HELP["kernel_size"])
    g.add_argument("--arrangement", choices=ARRANGEMENTS, default=None, help=MODEL_HELP["arrangement"])
    g.add_argument("--preset", choices=tuple(PRESETS), default=None, help=MODEL_HELP["preset"])
    g.add_argument("--pool-types", type=pool_list, default=None, help=MODEL_HELP["pool_types"])
    g.add_argument("--spatial-compress", choices=("pool", "conv"), default=None, help=MODEL_HELP["spatial_compress"])
    g.add_argument("--no-spatial", dest="spatial", action="store_const", const=False, default=None,
                   help=MODEL_HELP["spatial"])
    n = parser.add_argument_group("network options")
    n.add_argument("--widen", type=width_factor, default=None, help=MODEL_HELP["widen"])
    n.add_argument("--width-mult", type=width_factor, default=None, help=MODEL_HELP["width_mult"])
    n.add_argument("--stride-in-1x1", action="store_const", const=True, default=None,
                   help=MODEL_HELP["stride_in_1x1"])
    n.add_argument("--in-chans", type=at_least(1, 4096), default=None, help=MODEL_HELP["in_chans"])


def pool_list(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated subset of the channel pools."""
    pools = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in pools if p not in POOL_TYPES]
    if not pools or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(POOL_TYPES)}, got {text!r}")
    return pools


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (and <= ``maximum``: past it a value is a typo that would exhaust
    memory or never finish); a bad one is argparse's one-line error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and <= {maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}{upper}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    return _bounded_float(text, math.inf)


def width_factor(text: str) -> float:
    """argparse type: a network width factor, above 0 and at most 16."""
    return _bounded_float(text, 16.0)


def _bounded_float(text: str, maximum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > maximum:
        upper = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise argparse.ArgumentTypeError(f"expected a finite number > 0{upper}, got {text!r}")
    return value


positive_float.__name__ = "number > 0"
width_factor.__name__ = "number in (0, 16]"


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers (at least one)."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values
