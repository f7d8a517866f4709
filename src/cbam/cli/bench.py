"""``cbam bench`` (and ``make bench``): run the benchmark under each allocator setting and print ratio tables.

glibc reads its malloc settings when a process starts, so each allocator setting is one child process
(``--allocator default`` / ``tuned``; ``both`` runs one after the other), each running this same command
with ``--allocator current``. Within a child every comparison is interleaved; across children only
like-for-like absolute times are shown.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..bench.report import render_markdown
from ..bench.runner import run_benchmark
from ..models import list_models
from ..train.config import available_devices, check_output_path
from .options import at_least
from .runtime import allocator_env, allocator_setting

DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """What to time, how long, under which allocator, and where the figures go."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--full", action="store_true",
                        help="ResNet-50 stage shapes at batch 32 (default: off, quick: two shapes at batch 8)")
    parser.add_argument("--rounds", type=at_least(5, 1000), default=5,
                        help="interleaved rounds, for the median and spread; at least 5 (default: %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=0.2,
                        help="each timing repeats a case until this many seconds have passed (default: %(default)s)")
    parser.add_argument("--dtypes", type=_dtypes, default=("fp32",),
                        help=f"comma-separated subset of {','.join(DTYPES)} for the module cases (default: fp32)")
    parser.add_argument("--no-modules", dest="modules", action="store_false",
                        help="skip the module cases (default: off, they run)")
    parser.add_argument("--no-networks", dest="networks", action="store_false",
                        help="skip the network cases (default: off, they run)")
    parser.add_argument("--no-compile", dest="compile_modules", action="store_false",
                        help="skip the torch.compile'd module variants (default: off, they run)")
    parser.add_argument("--compile-networks", action="store_true",
                        help="also time compiled plain and CBAM networks, minutes of compilation on a CPU "
                             "(default: off)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="time the CBAM networks without cbam.fuse (default: off, they are fused on the CPU)")
    parser.add_argument("--shapes", type=_shapes, default=None,
                        help="module input shapes NxCxHxW, comma-separated; overrides --full (default: by --full)")
    parser.add_argument("--network", default="resnet50",
                        help="registered model for the network cases (default: %(default)s)")
    parser.add_argument("--network-batch", type=at_least(1, 4096), default=8,
                        help="images per batch in the network cases (default: %(default)s)")
    parser.add_argument("--network-size", type=at_least(1, 4096), default=224,
                        help="input side of the network cases, in pixels (default: %(default)s)")
    parser.add_argument("--allocator", choices=("both", "default", "tuned", "current"), default="both",
                        help="glibc malloc setting, one child process each; 'current' runs in this process "
                             "(default: %(default)s)")
    parser.add_argument("--output", default="runs/bench/bench.json",
                        help="JSON file with every figure (default: %(default)s)")
    parser.add_argument("--markdown", default=None, help="markdown tables (default: --output with .md)")
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)


def _shapes(text: str) -> list[tuple[int, int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 32x256x56x56,8x2048x7x7, got {text!r}")
    return shapes  # type: ignore[return-value]


def _dtypes(text: str) -> tuple[str, ...]:
    dtypes = tuple(d.strip() for d in text.split(",") if d.strip())
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(DTYPES)}, got {text!r}")
    return dtypes


def _run_here(args: argparse.Namespace) -> dict[str, Any]:
    return run_benchmark(device=args.device, quick=not args.full, shapes=args.shapes, rounds=args.rounds,
                         min_seconds=args.min_seconds, dtypes=args.dtypes, modules=args.modules,
                         networks=args.networks, network_model=args.network, network_batch=args.network_batch,
                         network_size=args.network_size, compile_modules=args.compile_modules,
                         compile_networks=args.compile_networks, fuse=args.fuse, allocator=allocator_setting(),
                         log=lambda m: print(m, file=sys.stderr))


def _run_child(args: argparse.Namespace, setting: str) -> dict[str, Any]:
    """This command again in a child process started with allocator ``setting``; its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [a for a in args._argv if a != "bench"]
        cmd = [sys.executable, "-m", "cbam", "bench", *argv, "--allocator", "current", "--worker-json", str(out)]
        print(f"== allocator: {setting}", file=sys.stderr, flush=True)
        code = subprocess.call(cmd, env=allocator_env(setting))
        if code != 0:
            raise SystemExit(code)
        return json.loads(out.read_text())


def check_args(args: argparse.Namespace) -> None:
    """Every value the benchmark will use, checked before any timing or child process starts (ValueError)."""
    devices = [d for d in available_devices() if d != "auto"]
    if args.device not in devices:
        raise ValueError(f"device {args.device!r} is not available here; devices that exist: {', '.join(devices)}")
    if not math.isfinite(args.min_seconds) or not 0 <= args.min_seconds <= 60:
        raise ValueError(f"--min-seconds must be between 0 (one call a timing) and 60, got {args.min_seconds!r}")
    if args.shapes and max(n * c * h * w for n, c, h, w in args.shapes) > 2**31:
        raise ValueError(f"shapes of at most 2**31 elements each, got {args.shapes}")
    if args.networks and args.network not in list_models():
        raise ValueError(f"unknown model {args.network!r}; expected one of {', '.join(list_models())}")
    if args.modules and args.shapes and min(c for _, c, _, _ in args.shapes) < 16:
        raise ValueError(f"shapes need at least 16 channels (the modules' reduction ratio), got {args.shapes}")
    check_output_path(args.output, "output", folder=False)
    if args.markdown:
        check_output_path(args.markdown, "markdown", folder=False)


def run(args: argparse.Namespace) -> int:
    """Time here or in one child per allocator setting; write the JSON and markdown, print the tables."""
    check_args(args)
    if args.allocator == "current" or args.device.startswith("cuda"):
        results = [_run_here(args)]
    else:
        settings = ["default", "tuned"] if args.allocator == "both" else [args.allocator]
        results = [_run_child(args, s) for s in settings]
    if args.worker_json:
        Path(args.worker_json).write_text(json.dumps(results[0]))
        return 0
    text = render_markdown(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2) + "\n")
    md = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    md.write_text(text + "\n")
    print(text)
    print(f"\nwritten: {out} and {md}")
    return 0
