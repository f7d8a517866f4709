"""``cbam bench`` (and ``make bench``): run the benchmark under each allocator setting and print ratio tables.

glibc reads its malloc settings when a process starts, so each allocator setting is one child process
(``--allocator default`` / ``tuned``; ``both`` runs one after the other). Within a child every comparison
is interleaved; across children only like-for-like absolute times are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .runner import TUNED_ENV, allocator_setting


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--full", action="store_true",
                        help="ResNet-50 stage shapes at batch 32 (default: quick, two shapes at batch 8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median and spread; >= 5)")
    parser.add_argument("--min-seconds", type=float, default=0.2,
                        help="each timing repeats a case until this long has passed")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument("--no-modules", dest="modules", action="store_false", help="skip the module cases")
    parser.add_argument("--no-networks", dest="networks", action="store_false", help="skip the network cases")
    parser.add_argument("--no-compile", dest="compile_modules", action="store_false",
                        help="skip torch.compile'd module variants")
    parser.add_argument("--compile-networks", action="store_true",
                        help="also time compiled plain and CBAM networks (minutes of compilation on a CPU)")
    parser.add_argument("--shapes", type=_shapes, default=None,
                        help="module shapes NxCxHxW, comma-separated (overrides --full)")
    parser.add_argument("--network", default="resnet50", help="registered model for the network cases")
    parser.add_argument("--network-batch", type=int, default=8)
    parser.add_argument("--network-size", type=int, default=224)
    parser.add_argument("--allocator", choices=("both", "default", "tuned", "current"), default="both",
                        help="glibc malloc setting per child process; 'current' runs in this process")
    parser.add_argument("--output", default="runs/bench/bench.json", help="JSON with every figure")
    parser.add_argument("--markdown", default=None, help="markdown tables (default: beside --output)")
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)


def _shapes(text: str) -> list[tuple[int, int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 32x256x56x56,8x2048x7x7, got {text!r}")
    return shapes  # type: ignore[return-value]


def _run_here(args: argparse.Namespace) -> dict[str, Any]:
    from .runner import run_benchmark

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in dtypes if d not in ("fp32", "bf16", "fp16")]
    if bad or not dtypes:
        raise UsageError(f"--dtypes expects a comma-separated subset of fp32,bf16,fp16, got {args.dtypes!r}")
    if args.rounds < 5:
        raise UsageError(f"--rounds must be at least 5 (medians of interleaved rounds), got {args.rounds}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here")
    return run_benchmark(device=args.device, quick=not args.full, shapes=args.shapes, rounds=args.rounds,
                         min_seconds=args.min_seconds,
                         dtypes=dtypes, modules=args.modules, networks=args.networks, network_model=args.network,
                         network_batch=args.network_batch,
                         network_size=args.network_size, compile_modules=args.compile_modules,
                         compile_networks=args.compile_networks, log=lambda m: print(m, file=sys.stderr))


def _run_child(args: argparse.Namespace, setting: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_ENV}
    if setting == "tuned":
        env.update(TUNED_ENV)
    env["CBAM_MALLOC"] = "as-is"  # the child must not re-tune itself
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [a for a in args._argv if a != "bench"]
        cmd = [sys.executable, "-m", "cbam", "bench", *argv, "--allocator", "current", "--worker-json", str(out)]
        print(f"== allocator: {setting}", file=sys.stderr, flush=True)
        code = subprocess.call(cmd, env=env)
        if code != 0:
            raise SystemExit(code)
        return json.loads(out.read_text())


def run(args: argparse.Namespace) -> int:
    if args.allocator == "current" or args.device.startswith("cuda"):
        results = [_run_here(args)]
    else:
        settings = ["default", "tuned"] if args.allocator == "both" else [args.allocator]
        results = [_run_child(args, s) for s in settings]
    if args.worker_json:
        Path(args.worker_json).write_text(json.dumps(results[0]))
        return 0
    from .report import render_markdown

    text = render_markdown(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2) + "\n")
    md = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    md.write_text(text + "\n")
    print(text)
    print(f"\nwritten: {out} and {md}")
    return 0


__all__ = ["add_arguments", "allocator_setting", "run"]
