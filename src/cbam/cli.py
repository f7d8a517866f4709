"""The ``cbam`` command line: one subcommand per job (profile, train, eval, demo, ablate).

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from collections.abc import Sequence

from .errors import UsageError

# subcommand -> (module, function adding its arguments, function running it, help)
COMMANDS = {
    "profile": ("cbam.profile", "add_arguments", "run",
                "params and GMACs of a model; --paper reproduces the paper's Tables 4 and 5"),
    "train": ("cbam.train.cli", "add_train_arguments", "run_train",
              "train a network (one process, or many through torchrun)"),
    "eval": ("cbam.train.cli", "add_eval_arguments", "run_eval", "top-1 / top-5 error and loss of a saved run"),
    "demo": ("cbam.train.compare", "add_demo_arguments", "run_demo",
             "train a plain and a CBAM network on synthetic data and compare them"),
    "ablate": ("cbam.train.compare", "add_ablate_arguments", "run_ablate",
               "the paper's ablations (Tables 1-3) plus plain and SE, in the paper's form"),
    "bench": ("cbam.bench.cli", "add_arguments", "run",
              "time and memory of CBAM next to plain, SE and timm, as ratios measured side by side"),
}
# Subcommands whose CPU work runs with the tuned glibc allocator unless CBAM_MALLOC says otherwise.
TUNED_MALLOC_COMMANDS = ("train", "demo", "ablate")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit code 2) instead of usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cbam", description="CBAM (Woo et al., ECCV 2018) for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, (module, add, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), add)(p)
        p.set_defaults(_run=(module, run))
    return parser


def _reexec_with_tuned_malloc(argv: list[str]) -> None:
    """Restart this process with glibc keeping freed large blocks (see README, "The CPU allocator").

    glibc reads MALLOC_* only at start-up, so the setting cannot be made from inside Python. Skipped when
    CBAM_MALLOC is set (``CBAM_MALLOC=default`` is the way out), when the variables are already there, and
    off Linux.
    """
    from .bench.runner import TUNED_ENV

    already = os.environ.get("CBAM_MALLOC") or any(k in os.environ for k in TUNED_ENV)
    if already or not sys.platform.startswith("linux"):
        return
    env = {**os.environ, **TUNED_ENV, "CBAM_MALLOC": "tuned"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "cbam", *argv], env)


def main(argv: Sequence[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_shell and argv and argv[0] in TUNED_MALLOC_COMMANDS:
        _reexec_with_tuned_malloc(argv)
    args = build_parser().parse_args(argv)
    args._argv = argv  # the launcher (--nproc-per-node) re-runs the same command under torchrun
    module, run = args._run
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except UsageError as exc:
        print(f"cbam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
