"""``cbam profile``: parameters and multiply-accumulates counted from the built model.

The paper's "GFLOPs" are multiply-accumulates of convolutions and linear layers at 224 x 224, batch 1
(pooling and element-wise work not counted). We count them with ``torch.utils.flop_counter`` on the meta
device (no memory, no compute), so every number printed here is measured from the model, never stored.
``--paper`` prints each row of the paper's Tables 4 and 5 beside the measured values.
"""

from __future__ import annotations

import argparse
import functools
import json

from .errors import UsageError
from .models import list_models
from .models._registry import model_meta
from .models.complexity import profile_model
from .models.paper import PAPER_ROWS
from .options import add_model_arguments, attention_arg, model_kwargs
from .report import FORMATS, format_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="registered model name (see --list)")
    parser.add_argument("--paper", action="store_true", help="every row of the paper's Tables 4 and 5")
    parser.add_argument("--list", action="store_true", help="list the registered models")
    parser.add_argument("--input-size", type=_size, default=None, help="H or HxW (default: the model's, 224)")
    parser.add_argument("--format", choices=FORMATS, default="table")
    add_model_arguments(parser)


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive integers, got {text!r}")
    return (parts[0], parts[-1])


def paper_table() -> list[dict]:
    """Rows of Tables 4 and 5: the paper's params and GFLOPs beside the counted ones."""
    return [dict(row) for row in _paper_table()]


@functools.cache
def _paper_table() -> tuple[dict, ...]:
    rows = []
    for row in PAPER_ROWS:
        counted = row.profile()
        params = counted["params"] / 1e6
        gmacs = counted["macs"] / 1e9
        rows.append(
            {
                "table": row.table,
                "model": row.label,
                "convention": "v1 stride" if row.profile_kwargs.get("stride_in_1x1") else "",
                "paper_params_m": row.params_m,
                "params_m": round(params, 2),
                "params_diff": round(round(params, 2) - row.params_m, 2),
                "paper_gflops": row.gflops,
                "gmacs": round(gmacs, 3),
                "gflops_diff": round(round(gmacs, 3) - row.gflops, 3),
                "match": "yes" if round(params, 2) == row.params_m and round(gmacs, 3) == row.gflops else "no",
                "exact_params": counted["params"],
                "exact_macs": counted["macs"],
            }
        )
    return tuple(rows)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.paper:
        rows = paper_table()
        columns = ["table", "model", "convention", "paper_params_m", "params_m", "params_diff", "paper_gflops", "gmacs",
                   "gflops_diff", "match"]
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            print(format_rows(rows, columns, args.format,
                              digits={"paper_params_m": 2, "params_m": 2, "params_diff": 2, "paper_gflops": 3,
                                      "gmacs": 3, "gflops_diff": 3}))
            matched = sum(r["match"] == "yes" for r in rows)
            if args.format == "table":
                print(f"\n{matched}/{len(rows)} rows match the paper to its printed precision "
                      "(params 0.01 M, GFLOPs 0.001 G; GFLOPs = multiply-accumulates at 224x224, batch 1).")
        return 0
    if not args.model:
        raise UsageError("expected a model name (or --paper / --list); e.g. cbam profile resnet50 --attention cbam")
    kwargs = model_kwargs(vars(args))
    if args.input_size is not None:
        kwargs["input_size"] = args.input_size
    counted = profile_model(args.model, attention=attention_arg(args.attention), **kwargs)
    row = {
        "model": args.model,
        "attention": args.attention or "none",
        "input": "x".join(map(str, args.input_size or (model_meta(args.model)["input_size"],) * 2)),
        "params_m": counted["params"] / 1e6,
        "gmacs": counted["macs"] / 1e9,
        "params": counted["params"],
        "macs": counted["macs"],
    }
    if args.format == "json":
        print(json.dumps(row, indent=2))
    else:
        print(format_rows([row], list(row), args.format, digits={"params_m": 2, "gmacs": 3}))
    return 0
