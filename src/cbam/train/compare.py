"""Several trainings of one recipe, compared side by side (behind ``cbam demo`` and ``cbam ablate``).

:func:`demo` trains the plain, SE and CBAM forms of one network over several seeds and says whether their
differences are larger than the seed-to-seed spread (the README's first command, through ``make demo``).
:func:`ablate` runs the configurations of the paper's Tables 1-3 (channel pooling, spatial compression and kernel
size, arrangement) plus the plain and SE networks, and renders them in the paper's
form, with mean +- standard deviation over seeds when several are given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from ..fused import fuse
from ..report import format_rows
from .config import TrainConfig, from_dict
from .engine import build_model, datasets_for, fuse_wanted, train
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


def run_folder(root: Path, key: str, seed: int, seeds: list[int]) -> Path:
    """Where :func:`run_variants` trains variant ``key`` for ``seed``: ``root/key``, or ``root/key-seedN`` among
    several seeds."""
    return root / (key if len(seeds) == 1 else f"{key}-seed{seed}")


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
                out = run_folder(root, key, seed, seeds)
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
              "top-5 err (%)": _error_cell(r["top5_err"], r["top5_sd"])}
             for r in rows]  # the runs' own images/s are not comparable (different times, loads): see cbam bench
    return format_rows(shown, fmt=fmt, digits={"params (M)": 3, "GMACs": 4})


DEMO_VARIANTS = ("plain", "se", "cbam")
DEMO_NAMES = {"plain": "nothing", "se": "SE", "cbam": "CBAM"}


def speed_side_by_side(base: TrainConfig, keys: list[str], *, rounds: int = 5, steps: int = 2) -> dict[str, float]:
    """Training images per second of each variant's network, measured interleaved in this process.

    One untrained copy of each network (fused as training fuses it) takes ``steps`` optimizer steps on random
    images of the run's batch and size, variant after variant, ``rounds`` times; the median round counts. The rows
    share the threads, the machine's load and the allocator's state, so their ratios are comparable (the training
    runs' own images/s are not: they ran at different times).
    """
    _, val_set, data = datasets_for(dataclasses.replace(base, synthetic_train_size=1, synthetic_val_size=1))
    del val_set
    models, optimizers = {}, {}
    for key in keys:
        cfg = dataclasses.replace(base, **VARIANTS[key][1])
        torch.manual_seed(0)
        model = build_model(cfg, data.num_classes, data.in_chans).train()
        if fuse_wanted(cfg, torch.device("cpu")):
            fuse(model, memory_efficient=cfg.memory_efficient)
        models[key] = model
        optimizers[key] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(base.batch_size, data.in_chans, data.image_size, data.image_size)
    y = torch.randint(0, data.num_classes, (base.batch_size,))
    times: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(rounds + 1):  # round 0 warms up (allocations, first-call costs) and is not counted
        for key in keys:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(models[key](x), y)
                loss.backward()
                optimizers[key].step()
                optimizers[key].zero_grad(set_to_none=True)
            if r:
                times[key].append(time.perf_counter() - t0)
    return {key: steps * base.batch_size / statistics.median(t) for key, t in times.items()}


def _verdict(diff: float, spread: float | None, n_seeds: int) -> str:
    if spread is None:
        return "not judged: one seed measures no spread (run with --seeds 0,1,...)"
    if spread == 0.0:
        return "not judged: the seeds gave identical errors"
    ratio = abs(diff) / spread
    size = "larger than" if ratio > 2 else "within"
    return f"{size} the seed-to-seed spread ({ratio:.1f} x its largest standard deviation, {n_seeds} seeds)"


def demo(base: TrainConfig, root: Path, fmt: str = "table", *, seeds: list[int] | None = None,
         speed: bool = True) -> str | None:
    """Train ``base`` plain, with SE and with CBAM for every seed into ``root``; write ``root``/results.md and .json.

    The report says what chance is, how many seeds ran, the errors as mean ± standard deviation over the seeds,
    and whether each difference to the plain network is larger than the seed-to-seed spread (more than twice the
    larger of the two rows' standard deviations: a rough yardstick, not a significance test). Images per second
    are measured side by side after training (:func:`speed_side_by_side`), never taken from the runs. Returns the
    report, or None in a process that is not rank 0 (it has no results).
    """
    seeds = [base.seed] if not seeds else list(seeds)
    keys = list(DEMO_VARIANTS)
    results = run_variants(base, keys, seeds, root)
    if not results:
        return None
    summaries = {k: summarise(k, runs) for k, runs in results.items()}
    per_seed = {k: [r["final_top1_err"] for r in runs] for k, runs in results.items()}
    classes = results[keys[0]][0].get("num_classes") or _classes(base)
    chance = None if classes is None else 100.0 * (1 - 1 / classes)
    on_cpu = base.device == "cpu" or (base.device == "auto" and not torch.cuda.is_available())
    rates = speed_side_by_side(base, keys) if speed and on_cpu else {}
    rows = []
    for key in keys:
        s = summaries[key]
        row = {"network": f"{base.model} + {DEMO_NAMES[key]}",
               "top-1 err (%)": _error_cell(s["top1_err"], s["top1_sd"]),
               "per seed": ", ".join(f"{v:.1f}" for v in per_seed[key]),
               "top-5 err (%)": _error_cell(s["top5_err"], s["top5_sd"]),
               "params (M)": s["params_m"], "GMACs": s["gmacs"]}
        if rates:
            row["train images/s"] = rates[key]
        rows.append(row)
    what_chance = "chance unknown" if chance is None else f"chance is {chance:.1f} % top-1 error ({classes} classes)"
    lines = [f"{base.dataset}, {base.model}, {base.epochs} epochs, {len(seeds)} seed(s) per network "
             f"({', '.join(map(str, seeds))}); {what_chance}."]
    plain = summaries["plain"]
    spreads = {}
    for key in keys[1:]:
        s = summaries[key]
        diff = s["top1_err"] - plain["top1_err"]
        spread = None if s["top1_sd"] is None else max(s["top1_sd"], plain["top1_sd"])
        spreads[key] = {"difference": diff, "spread": spread}
        verdict = _verdict(diff, spread, len(seeds))
        lines.append(f"{DEMO_NAMES[key]} - plain: {diff:+.2f} points of top-1 error; {verdict}.")
    if rates:
        lines.append(f"train images/s: measured side by side on the CPU after training ({torch.get_num_threads()} "
                     "threads, median of 5 interleaved rounds), not the runs' own.")
    elif speed:
        lines.append("train images/s: not printed (measured side by side on the CPU only; on a GPU use cbam bench).")
    table = format_rows(rows, fmt=fmt, digits=DEMO_DIGITS)
    (root / "results.md").write_text("\n".join(lines) + "\n\n" + format_rows(rows, fmt="markdown", digits=DEMO_DIGITS)
                                     + "\n")
    (root / "results.json").write_text(json.dumps(
        {"dataset": base.dataset, "model": base.model, "epochs": base.epochs, "seeds": seeds,
         "chance_top1_err": chance,
         "rows": [{k: v for k, v in r.items() if k != "images_per_s"} for r in summaries.values()],
         "per_seed_top1_err": per_seed,
         "differences_to_plain": spreads, "train_images_per_s": rates}, indent=2) + "\n")
    return "\n".join(lines) + "\n" + table


def _classes(base: TrainConfig) -> int | None:
    """Classes of the data set for runs whose summary lacks them (older versions); None for image folders."""
    known = {"synthetic": base.synthetic_classes, "cifar100": 100, "imagefolder": None}
    return known.get(base.dataset, 10)


DEMO_DIGITS = {"top-5 err (%)": 2, "params (M)": 3, "GMACs": 4, "train images/s": 0}


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
