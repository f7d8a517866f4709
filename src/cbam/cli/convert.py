"""``cbam convert IN OUT.safetensors``: a checkpoint of this package, the authors' release, timm's CBAM ResNet or
torchvision's ResNet into this package's safetensors, checked where the source network can be built here.

The work is :func:`cbam.convert.convert_checkpoint`'s; this module reads the flags and prints one summary line.
"""

from __future__ import annotations

import argparse

from ..convert import LAYOUT_NAMES, convert_checkpoint
from ..layers import ARRANGEMENTS, PRESETS
from .options import ATTENTION_CHOICES, at_least, pool_list

INFERRED = "(default: inferred from the checkpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The two files, the model (inferred unless given) and the CBAM options that override what is inferred."""
    parser.add_argument("input", help="checkpoint to convert: .safetensors, .pt or .pth (default: none, required)")
    parser.add_argument("output", help="converted weights to write, a .safetensors path; replaced atomically, left "
                                       "untouched on any error (default: none, required)")
    parser.add_argument("--model", default=None,
                        help="registered model name, e.g. resnet50 (default: inferred from the block type and the "
                             "blocks per stage, or the file's record)")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                        help="attention of the converted model; cbam on a plain ResNet adds identity-initialised "
                             "modules (default: the checkpoint's)")
    g = parser.add_argument_group("CBAM options (create_model keywords; those that show in the tensors are inferred)")
    g.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="CBAM's small details (biases, norm, init) as in the paper's release, its seed code, timm or "
                        "Ultralytics " + INFERRED)
    g.add_argument("--reduction", type=at_least(1, 4096), default=None,
                   help="channel-MLP reduction ratio r: hidden units = channels / r " + INFERRED)
    g.add_argument("--kernel-size", type=at_least(1, 255), default=None,
                   help="side of the spatial gate's convolution, in pixels " + INFERRED)
    g.add_argument("--pool-types", type=pool_list, default=None,
                   help="channel-gate pools, comma-separated, e.g. avg,max (default: the file's record, else avg,max)")
    g.add_argument("--arrangement", choices=ARRANGEMENTS, default=None,
                   help="order of the channel and spatial gates (default: the file's record, else channel_first)")


def run(args: argparse.Namespace) -> int:
    """Convert, check, write, and print what was done in one line."""
    done = convert_checkpoint(
        args.input,
        args.output,
        model=args.model,
        attention=args.attention,
        preset=args.preset,
        reduction=args.reduction,
        kernel_size=args.kernel_size,
        pool_types=args.pool_types,
        arrangement=args.arrangement,
    )
    options = ", ".join(f"{k}={v}" for k, v in sorted({**done["model_kwargs"], **done["module_kwargs"]}.items()))
    print(
        f"{done['source']} ({LAYOUT_NAMES[done['format']]} format) -> {done['out']}: {done['model']}"
        f"{f' ({options})' if options else ''}, attention {done['attention']}, {done['num_classes']} classes, "
        f"{done['tensors']} tensors, {done['params'] / 1e6:.2f}M parameters; {done['check']}"
    )
    return 0
