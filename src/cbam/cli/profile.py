"""``cbam profile``: parameters and multiply-accumulates of a model, or the paper's Tables 4 and 5 (``--paper``).

The counting is :mod:`cbam.profile`'s; this module reads the flags and prints in the chosen format.
"""

from __future__ import annotations

import argparse
import json

from ..models import list_models
from ..profile import PAPER_COLUMNS, PAPER_DIGITS, ROW_DIGITS, paper_table, profile_row
from ..report import FORMATS, format_rows
from ..train.config import model_kwargs
from .options import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, what to print and how, and the model options."""
    parser.add_argument("model", nargs="?",
                        help="registered model name, see --list (default: none; needed unless --paper or --list)")
    parser.add_argument("--paper", action="store_true",
                        help="every row of the paper's Tables 4 and 5 beside the counted values (default: off)")
    parser.add_argument("--list", action="store_true", help="list the registered models (default: off)")
    parser.add_argument("--input-size", type=image_size, default=None,
                        help="input H or HxW, in pixels (default: the model's, 224 or 32 for CIFAR models)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: %(default)s)")
    add_model_arguments(parser)


def image_size(text: str) -> tuple[int, int]:
    """argparse type: H or HxW, positive integers."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive integers, got {text!r}")
    return (parts[0], parts[-1])


def run(args: argparse.Namespace) -> int:
    """Print the list, the paper's tables or one model's row."""
    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.paper:
        rows = paper_table()
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            print(format_rows(rows, PAPER_COLUMNS, args.format, digits=PAPER_DIGITS))
            matched = sum(r["match"] == "yes" for r in rows)
            if args.format == "table":
                print(f"\n{matched}/{len(rows)} rows match the paper to its printed precision "
                      "(params 0.01 M, GFLOPs 0.001 G; GFLOPs = multiply-accumulates at 224x224, batch 1).")
        return 0
    if not args.model:
        raise ValueError("expected a model name (or --paper / --list); e.g. cbam profile resnet50 --attention cbam")
    row = profile_row(args.model, attention=args.attention, input_size=args.input_size, **model_kwargs(vars(args)))
    if args.format == "json":
        print(json.dumps(row, indent=2))
    else:
        print(format_rows([row], list(row), args.format, digits=ROW_DIGITS))
    return 0
