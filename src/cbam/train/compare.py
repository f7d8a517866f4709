"""Several trainings of one recipe, compared side by side (behind ``cbam demo`` and ``cbam ablate``).

:func:`demo` trains a plain and a CBAM network on the synthetic data (the README's first command, through
``make demo``). :func:`ablate` runs the configurations of the paper's Tables 1-3 (channel pooling, spatial
compression and kernel size, arrangement) plus the plain and SE networks, and renders them in the paper's
form, with mean +- standard deviation over seeds when several are given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ..report import format_rows
from .config import TrainConfig, from_dict
from .engine import train
from .signals import Interrupted, StopFlag

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


# settings that do not change what a run computes: a stored run that differs only in these is the same run
_NOT_RUN_DEFINING = {"output", "resume", "overwrite", "progress", "tensorboard", "workers", "config",
                     "save_every_steps"}


def _differences(cfg: TrainConfig, out: Path) -> list[str] | None:
    """The run-defining settings in which the run stored in ``out`` (its config.yaml) differs from ``cfg``;
    None when there is no readable stored configuration."""
    try:
        stored = asdict(from_dict(yaml.safe_load((out / "config.yaml").read_text()) or {}))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None
    wanted = asdict(cfg)
    return [f"{k}: {stored[k]!r} -> {wanted[k]!r}" for k in wanted
            if k not in _NOT_RUN_DEFINING and stored.get(k) != wanted[k]]


def _finished_summary(out: Path) -> dict[str, Any] | None:
    """The summary of the finished run in ``out`` (summary.json and model.safetensors written), else None."""
    if not (out / "model.safetensors").is_file():
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def plan_run(cfg: TrainConfig, out: Path) -> tuple[str, str, TrainConfig, dict[str, Any] | None]:
    """What a rerun does with the run folder ``out``, as (action, why, the configuration to train, summary).

    "done" (with the stored summary): a finished run with the same settings, not trained again; "resume": an
    interrupted one with the same settings and a checkpoint; "start": anything else (``why`` says what was
    there, empty for a folder that does not exist).
    """
    fresh = dataclasses.replace(cfg, output=str(out), overwrite=True, resume=False)
    if not out.exists():
        return "start", "", fresh, None
    summary = _finished_summary(out)
    has_checkpoint = (out / "checkpoints" / "last.pt").is_file()
    differs = _differences(cfg, out)
    if differs is None:
        why = "its config.yaml is missing or unreadable" if summary or has_checkpoint else "nothing saved there"
        return "start", why, fresh, None
    if differs:
        return "start", "the run there has other settings: " + "; ".join(differs), fresh, None
    if summary is not None:
        return "done", "", cfg, summary
    if has_checkpoint:
        return "resume", "", dataclasses.replace(cfg, output=str(out), overwrite=False, resume=True), None
    return "start", "no checkpoint there", fresh, None


def run_variants(base: TrainConfig, keys: list[str], seeds: list[int], root: Path) -> dict[str, list[dict]]:
    """Train every variant for every seed (in order, one run folder each) and collect the summaries.

    Run again after an interruption, it continues: finished runs (same settings, summary.json written) are
    not trained again, the interrupted one resumes from its checkpoint (or starts over when it has none),
    and each run's first line says which. SIGINT / SIGTERM end in :class:`Interrupted` (the finished runs
    kept, the running one saved), with advice to run the same command again.
    """
    results: dict[str, list[dict]] = {}
    finished: list[str] = []
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1  # under torchrun only the training loop's check is agreed
    with StopFlag() as stop:
        for key in keys:
            for seed in seeds:
                if stop.signum and single:  # came between two runs (the training loop acts on one during a run)
                    raise _stopped(stop.signum, finished, None)
                out = root / (key if len(seeds) == 1 else f"{key}-seed{seed}")
                cfg = dataclasses.replace(base, **VARIANTS[key][1], seed=seed, output=str(out))
                action, why, cfg, summary = plan_run(cfg, out)
                head = f"== {key}: {VARIANTS[key][0]} (seed {seed}) -> {out}"
                if action == "done":
                    head += ": finished earlier, kept (not trained again)"
                elif action == "resume":
                    head += f": resuming the interrupted run from {out / 'checkpoints' / 'last.pt'}"
                elif why:
                    head += f": starting over ({why})"
                print(head, flush=True)
                if summary is None:
                    try:
                        summary = train(cfg)
                    except Interrupted as exc:
                        raise _stopped(exc.signum, finished, exc.checkpoint) from None
                if summary:
                    results.setdefault(key, []).append(summary)
                finished.append(out.name)
    return results


def _stopped(signum: int, finished: list[str], checkpoint: Path | None) -> Interrupted:
    done = f"finished runs kept ({', '.join(finished)})" if finished else "no run finished yet"
    saved = f"the interrupted one saved in {checkpoint}" if checkpoint else None
    return Interrupted(signum, checkpoint, "; ".join(x for x in (done, saved) if x)
                       + "; run the same command again to continue")


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
