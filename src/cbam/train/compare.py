"""Several trainings of one recipe, compared side by side (behind ``cbam demo`` and ``cbam ablate``).

:func:`demo` trains a plain and a CBAM network on the synthetic data (the README's first command, through
``make demo``). :func:`ablate` runs the configurations of the paper's Tables 1-3 (channel pooling, spatial
compression and kernel size, arrangement) plus the plain and SE networks, and renders them in the paper's
form, with mean +- standard deviation over seeds when several are given.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from ..report import format_rows
from .config import TrainConfig
from .engine import train

# key -> (description in the paper's words, TrainConfig overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("baseline (no attention)", {"attention": "none"}),
    "se": ("SE (= channel: AvgPool)", {"attention": "se"}),
    "ch_max": ("channel: MaxPool", {"attention": "cbam", "spatial": False, "pool_types": ["max"]}),
    "ch_avgmax": ("channel: AvgPool & MaxPool",
                  {"attention": "cbam", "spatial": False, "pool_types": ["avg", "max"]}),
    "conv_k3": ("channel + spatial (1x1 conv, k = 3)",
                {"attention": "cbam", "spatial_compress": "conv", "kernel_size": 3}),
    "conv_k7": ("channel + spatial (1x1 conv, k = 7)",
                {"attention": "cbam", "spatial_compress": "conv", "kernel_size": 7}),
    "pool_k3": ("channel + spatial (avg & max, k = 3)", {"attention": "cbam", "kernel_size": 3}),
    "cbam": ("channel + spatial (avg & max, k = 7) = CBAM", {"attention": "cbam"}),
    "spatial_first": ("spatial + channel (sequential)", {"attention": "cbam", "arrangement": "spatial_first"}),
    "parallel": ("channel & spatial in parallel", {"attention": "cbam", "arrangement": "parallel"}),
}
# the paper's tables as lists of variant keys (channel-first CBAM appears in Tables 2 and 3, as in the paper)
TABLES: dict[str, tuple[str, list[str]]] = {
    "1": ("Table 1: channel attention pooling", ["plain", "se", "ch_max", "ch_avgmax"]),
    "2": ("Table 2: spatial attention on top of channel (avg & max)",
          ["ch_avgmax", "conv_k3", "conv_k7", "pool_k3", "cbam"]),
    "3": ("Table 3: arrangement of the two gates", ["se", "cbam", "spatial_first", "parallel"]),
}


def run_variants(base: TrainConfig, keys: list[str], seeds: list[int], root: Path) -> dict[str, list[dict]]:
    """Train every variant for every seed (in order, one run folder each) and collect the summaries."""
    results: dict[str, list[dict]] = {}
    for key in keys:
        for seed in seeds:
            out = root / (key if len(seeds) == 1 else f"{key}-seed{seed}")
            cfg = dataclasses.replace(base, **VARIANTS[key][1], seed=seed, output=str(out), overwrite=True,
                                      resume=False)
            print(f"== {key}: {VARIANTS[key][0]} (seed {seed}) -> {out}", flush=True)
            summary = train(cfg)
            if summary:
                results.setdefault(key, []).append(summary)
    return results


def _mean_spread(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(key: str, runs: list[dict]) -> dict[str, Any]:
    """One row of an ablation table: a variant's cost and its errors as mean (and spread) over seeds."""
    top1, top1_sd = _mean_spread([r["final_top1_err"] for r in runs])
    top5, top5_sd = _mean_spread([r["final_top5_err"] for r in runs])
    return {
        "variant": key, "description": VARIANTS[key][0], "params_m": runs[0]["params"] / 1e6,
        "gmacs": runs[0]["gmacs"], "top1_err": top1, "top1_sd": top1_sd, "top5_err": top5, "top5_sd": top5_sd,
        "images_per_s": statistics.fmean(r["images_per_s"] for r in runs), "seeds": len(runs),
    }


def _error_cell(mean: float, spread: float | None) -> str:
    return f"{mean:.2f}" if spread is None else f"{mean:.2f} ± {spread:.2f}"


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """Ablation rows in the paper's columns, in one of the report formats."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    shown = [{"description": r["description"], "params (M)": r["params_m"], "GMACs": r["gmacs"],
              "top-1 err (%)": _error_cell(r["top1_err"], r["top1_sd"]),
              "top-5 err (%)": _error_cell(r["top5_err"], r["top5_sd"]), "images/s": r["images_per_s"]}
             for r in rows]
    return format_rows(shown, fmt=fmt, digits={"params (M)": 3, "GMACs": 4, "images/s": 0})


DEMO_DIGITS = {"top-1 err (%)": 2, "top-5 err (%)": 2, "params (M)": 3, "GMACs": 4, "images/s": 0, "train s": 0}


def demo(base: TrainConfig, root: Path, fmt: str = "table") -> str | None:
    """Train ``base`` plain and with CBAM into ``root``/plain and ``root``/cbam; write ``root``/results.md.

    Returns the comparison rendered in ``fmt``, or None in a process that is not rank 0 (it has no results).
    """
    results = run_variants(base, ["plain", "cbam"], [base.seed], root)
    if not results:
        return None
    rows = []
    for key, runs in results.items():
        r = runs[0]
        rows.append({"network": f"{base.model} + {'CBAM' if key == 'cbam' else 'nothing'}",
                     "top-1 err (%)": r["final_top1_err"], "top-5 err (%)": r["final_top5_err"],
                     "params (M)": r["params"] / 1e6, "GMACs": r["gmacs"], "images/s": r["images_per_s"],
                     "train s": r["wall_time_s"]})
    (root / "results.md").write_text(format_rows(rows, fmt="markdown", digits=DEMO_DIGITS) + "\n")
    return format_rows(rows, fmt=fmt, digits=DEMO_DIGITS)


def ablate(base: TrainConfig, root: Path, *, budget: int, seeds: list[int], tables: list[str],
           fmt: str = "table") -> str | None:
    """Train the variants of the paper's ``tables`` for ``budget`` epochs per seed; write results.json / .md.

    Returns the tables rendered in ``fmt``, or None in a process that is not rank 0. A budget below one
    epoch, no seeds or an unknown table is a ValueError before anything is trained.
    """
    if budget < 1:
        raise ValueError(f"budget is epochs per configuration and must be at least 1, got {budget}")
    unknown = [t for t in tables if t not in TABLES]
    if unknown or not tables:
        raise ValueError(f"tables must be a non-empty subset of {', '.join(TABLES)}, got {tables!r}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    base = dataclasses.replace(base, epochs=budget)
    keys = list(dict.fromkeys(k for t in tables for k in TABLES[t][1]))
    results = run_variants(base, keys, seeds, root)
    if not results:
        return None
    summaries = {k: summarise(k, runs) for k, runs in results.items()}
    (root / "results.json").write_text(json.dumps(list(summaries.values()), indent=2) + "\n")
    (root / "results.md").write_text("\n\n".join(
        f"{TABLES[t][0]}\n\n" + render([summaries[k] for k in TABLES[t][1]], "markdown") for t in tables) + "\n")
    return "\n\n".join(
        f"{TABLES[t][0]} ({base.model}, {base.dataset}, {budget} epochs, {len(seeds)} seed(s))\n"
        + render([summaries[k] for k in TABLES[t][1]], fmt) for t in tables)
