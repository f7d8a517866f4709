"""``cbam export CHECKPOINT --model NAME --format onnx|torchscript|exported-program OUT``: a network with its weights
exported with dynamic batch and image size, checked, then written.

The model is ``cbam.create_model(NAME, attention=..., num_classes=..., checkpoint=CHECKPOINT)``; the work is
:func:`cbam.export.export_model`'s (ONNX is compared with ONNX Runtime, the other two formats are loaded back and
compared with the model). OUT is written atomically and only after the check passed; one line says what was checked.
"""

from __future__ import annotations

import argparse

from ..export import DEFAULT_BATCH_SIZES, DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS, default_check_size, export_model
from ..factory import create_model
from ..models import model_meta
from ..train.config import model_kwargs
from .options import add_model_arguments, at_least, int_list
from .profile import image_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, the model it belongs to, the format and the file; the sizes and tolerance of the check."""
    parser.add_argument("checkpoint", help="weights to export, a checkpoint cbam.create_model loads, e.g. this "
                                           "package's .safetensors (required)")
    parser.add_argument("out", help="file to write; replaced atomically, and only after the check passed (required)")
    parser.add_argument("--model", required=True, help="registered model name the checkpoint belongs to, e.g. "
                                                       "resnet50; see cbam profile --list (required)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (checked with ONNX Runtime), torchscript (torch.jit.trace) or exported-program "
                             "(torch.export, saved with torch.export.save) (required)")
    parser.add_argument("--num-classes", type=at_least(1, 1_000_000), default=None,
                        help="classes of the checkpoint's classifier (default: the model's, 1000 or 10 for CIFAR "
                             "models)")
    parser.add_argument("--image-size", type=image_size, default=None,
                        help="input H or HxW the model is traced at, in pixels; batch and size stay dynamic "
                             "(default: the model's, 224 or 32 for CIFAR models)")
    parser.add_argument("--check-size", type=image_size, default=None,
                        help="second input size the export is compared at, H or HxW in pixels (default: about 3/4 "
                             "of --image-size, odd: 169x171 for 224)")
    parser.add_argument("--batch-sizes", type=batch_list, default=None,
                        help="batch sizes the export is compared at, comma-separated, in images (default: 1,2,3)")
    parser.add_argument("--tolerance", type=tolerance, default=DEFAULT_TOLERANCE,
                        help="largest accepted absolute difference between the export's outputs and the model's "
                             "(default: %(default)g)")
    parser.add_argument("--opset", type=at_least(18, 99), default=DEFAULT_OPSET,
                        help="ONNX operator set version, 18 or later; for --format onnx (default: %(default)s)")
    add_model_arguments(parser)


def batch_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated batch sizes, each at least 1."""
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return tuple(values)


def tolerance(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Build the model with its weights, export, check, write, and print one line."""
    size = args.image_size or (model_meta(args.model)["input_size"],) * 2  # an unknown name: ValueError, close names
    kwargs = model_kwargs(vars(args))
    try:
        model = create_model(args.model, attention=args.attention, num_classes=args.num_classes,
                             checkpoint=args.checkpoint, **kwargs)
    except RuntimeError as exc:  # load_state_dict's size or key mismatch: the checkpoint is not this model's
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"{args.checkpoint} does not fit {args.model}: {reason}") from None
    report = export_model(
        model,
        args.out,
        args.format,
        image_size=size,
        check_size=args.check_size or default_check_size(size),
        batch_sizes=args.batch_sizes or DEFAULT_BATCH_SIZES,
        tolerance=args.tolerance,
        opset=args.opset,
        in_chans=args.in_chans,
    )
    print(report.summary())
    return 0
