"""``cbam export``: being written (issue 14)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments yet."""


def run(args: argparse.Namespace) -> int:
    raise ValueError("cbam export is being written")
