"""``cbam demo`` and ``cbam ablate``: several trainings of one recipe, compared side by side.

``demo`` is the README's first command (through ``make demo``); ``ablate`` reproduces the form of the
paper's Tables 1-3. The work is :mod:`cbam.train.compare`'s; this module only reads the flags and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..report import FORMATS
from ..train.compare import DEMO_VARIANTS, TABLES, VARIANTS, ablate, demo, run_folder
from ..train.config import TrainConfig, check_output_path, resolve
from ..train.data import DATASETS, GENERATED
from ..viz import visualize
from .options import at_least, int_list


def _base_config(args: argparse.Namespace, recipe: str) -> TrainConfig:
    """The recipe (``--config``, else ``recipe``) with the TrainConfig keys given as flags; --output is the root."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and k != "output"}
    values["config"] = values.get("config") or recipe
    check_output_path(args.output, "output")
    return resolve(values, source="command line")


def _check_runs(base: TrainConfig, root: str, keys: list[str], seeds: list[int]) -> None:
    """Validate every run's configuration (each variant, each seed) before the first one starts."""
    for key in keys:
        for seed in seeds:
            dataclasses.replace(base, **VARIANTS[key][1], seed=seed, output=str(Path(root) / key), overwrite=True,
                                resume=False).validate()


def _add_common(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument("--config", default=None, help="recipe name or YAML file (default: demo)")
    parser.add_argument("--model", default=None, help="registered network (default: the recipe's)")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="data set (default: the recipe's)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the data set (default: none; needed for all but the generated ones)")
    parser.add_argument("--batch-size", type=at_least(1), default=None,
                        help="images per optimizer step (default: the recipe's, 64)")
    parser.add_argument("--lr", type=float, default=None, help="initial SGD learning rate (default: the recipe's)")
    parser.add_argument("--workers", type=at_least(0), default=None,
                        help="data-loader worker processes (default: 0 for generated data, else up to 8)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                        help="cbam.fuse on the CPU; --no-fuse keeps the plain blocks (default: on)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on)")
    parser.add_argument("--output", default=output,
                        help="folder for the runs, one sub-folder each (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: %(default)s)")


# ------------------------------------------------------------------------------------------ demo
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The common options plus epochs, seeds and the pictures."""
    _add_common(parser, "runs/demo")
    parser.add_argument("--epochs", type=at_least(1), default=None,
                        help="training epochs per network (default: the recipe's, 3)")
    parser.add_argument("--seeds", type=int_list, default=[0, 1],
                        help="comma-separated seeds, one run per network and seed; two or more measure the "
                             "seed-to-seed spread (default: 0,1)")
    parser.add_argument("--pictures", type=at_least(0), default=8,
                        help="test images drawn with cbam visualize after training, 0 for none (default: %(default)s)")


def run_demo(args: argparse.Namespace) -> int:
    """Train plain, SE and CBAM for every seed, print the comparison, draw what the first seed's CBAM attends to."""
    base = _base_config(args, "demo")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0, got {','.join(map(str, args.seeds))}")
    _check_runs(base, args.output, list(DEMO_VARIANTS), args.seeds)
    root = Path(args.output)
    text = demo(base, root, args.format, seeds=args.seeds)
    if text is None:
        return 0
    print(f"\n{text}\n(runs in {root}/<network>{'-seed<N>' if len(args.seeds) > 1 else ''}; "
          f"tables in {root}/results.md and results.json)")
    if args.pictures:
        _pictures(base, root, args)
    return 0


def _pictures(base: TrainConfig, root: Path, args: argparse.Namespace) -> None:
    """``cbam visualize`` of the first seed's CBAM run against its plain run, with the score where boxes exist."""
    first = args.seeds[0]
    boxes = base.dataset in GENERATED
    try:
        result = visualize(run_folder(root, "cbam", first, args.seeds),
                           compare=run_folder(root, "plain", first, args.seeds), output=root / "pictures",
                           num_images=args.pictures, score=boxes, progress=bool(base.progress))
    except ValueError as exc:  # grad-cam not installed: the comparison stands, say how to get the pictures
        print(f"pictures skipped: {exc}")
        return
    if result.get("table"):
        print(f"\nWhere the attention falls ({len(result['score'])} maps; see docs/visualize.md):\n"
              f"{result['table']}")
    print(f"pictures: {len(result['pictures'])} images and channel_gates.png in {root / 'pictures'}")


# ------------------------------------------------------------------------------------------ ablate
def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    """The common options plus the budget, the seeds and the tables."""
    _add_common(parser, "runs/ablate")
    parser.add_argument("--budget", type=at_least(1), required=True,
                        help="training epochs per configuration (required, no default)")
    parser.add_argument("--seeds", type=int_list, default=[0],
                        help="comma-separated seeds; more than one adds the spread (default: 0)")
    parser.add_argument("--tables", type=_table_list, default=list(TABLES),
                        help=f"which of the paper's tables, comma-separated (default: {','.join(TABLES)})")


def _table_list(text: str) -> list[str]:
    tables = [t.strip() for t in text.split(",") if t.strip()]
    if not tables or any(t not in TABLES for t in tables):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(TABLES)}, got {text!r}")
    return tables


def run_ablate(args: argparse.Namespace) -> int:
    """Train every configuration of the chosen tables, print them in the paper's form."""
    base = _base_config(args, "demo")
    keys = list(dict.fromkeys(k for t in args.tables for k in TABLES[t][1]))
    _check_runs(dataclasses.replace(base, epochs=args.budget), args.output, keys, args.seeds)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {','.join(map(str, args.seeds))}")
    text = ablate(base, Path(args.output), budget=args.budget, seeds=args.seeds, tables=args.tables, fmt=args.format)
    if text is not None:
        print("\n" + text)
    return 0
