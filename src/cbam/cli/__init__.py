"""The ``cbam`` command line: one subcommand per job (profile, train, eval, demo, ablate, bench, convert, export,
visualize).

This package is the only place that parses arguments: the library (``cbam.train``, ``cbam.bench``,
``cbam.models``, ``cbam.profile``) takes plain Python values and raises ``ValueError`` / ``TypeError`` on bad
ones. :func:`main` turns those, like argparse's own errors, into one line on stderr and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..train.signals import Interrupted
from . import bench, compare, convert, export, profile, train, visualize
from .runtime import TUNED_MALLOC_COMMANDS, reexec_with_tuned_malloc, stopped

__all__ = ["COMMANDS", "Command", "Parser", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: how it adds its arguments, how it runs (returns the exit code), its one-line help."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


COMMANDS: dict[str, Command] = {
    "profile": Command(profile.add_arguments, profile.run,
                       "params and GMACs of a model; --paper reproduces the paper's Tables 4 and 5"),
    "train": Command(train.add_train_arguments, train.run_train,
                     "train a network (one process, or many through torchrun)"),
    "eval": Command(train.add_eval_arguments, train.run_eval, "top-1 / top-5 error and loss of a saved run"),
    "demo": Command(compare.add_demo_arguments, compare.run_demo,
                    "train a network plain, with SE and with CBAM over seeds on the cluttered digits, compare, draw"),
    "ablate": Command(compare.add_ablate_arguments, compare.run_ablate,
                      "the paper's ablations (Tables 1-3) plus plain and SE, in the paper's form"),
    "bench": Command(bench.add_arguments, bench.run,
                     "time and memory of CBAM next to plain, SE and timm, as ratios measured side by side"),
    "convert": Command(convert.add_arguments, convert.run,
                       "a checkpoint from this package, the authors' release, timm or torchvision into safetensors"),
    "export": Command(export.add_arguments, export.run,
                      "a network with its checkpoint to ONNX, TorchScript or a torch.export program"),
    "visualize": Command(visualize.add_arguments, visualize.run,
                         "pictures of what a trained CBAM network attends to (gates, Grad-CAM); --score against boxes"),
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit code 2) instead of usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``cbam`` parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = Parser(prog="cbam", description="CBAM (Woo et al., ECCV 2018) for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
    return parser


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its lines joined), for the ``error:`` line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cbam ARGV`` (``sys.argv[1:]`` when None) and return its exit code.

    Started from the shell, ``train``, ``demo`` and ``ablate`` first restart themselves with the tuned glibc
    allocator (see :mod:`cbam.cli.runtime`). Bad flags and bad values are one line and exit code 2.
    """
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_shell and argv and argv[0] in TUNED_MALLOC_COMMANDS:
        reexec_with_tuned_malloc(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    args._argv = argv  # the launcher (--nproc-per-node) and the bench's children re-run the same command
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except (ValueError, TypeError) as exc:
        print(f"cbam {args.command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        return stopped(args.command, exc)
