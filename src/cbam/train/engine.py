"""The training engine behind ``cbam train``: one process or many, resumable to the exact step.

What makes a resumed run end bit-identical to an uninterrupted one: the sample order and each sample's
augmentation are functions of (seed, epoch, index) (``sampler.py``); the checkpoint holds model,
optimizer, scheduler, AMP scaler, epoch, step within the epoch, the epoch's running sums and every RNG
state; checkpoints are replaced atomically. SIGINT / SIGTERM set a flag (:mod:`cbam.train.signals`, from the
start of set-up on) that the loop checks after each step: it saves, says where, and leaves with exit code 130 / 143.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..fused import fuse
from ..insertion import init_attention
from ..models import create_model
from ..models.complexity import count_macs, count_params
from . import distributed as D
from .checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_checkpoint_or_previous,
    load_weights,
    previous_path,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from .config import (
    TrainConfig,
    check_loader_settings,
    check_output_path,
    check_resume,
    from_dict,
    stored_config,
    to_yaml,
)
from .data import GENERATED, build_datasets, build_loader
from .determinism import deterministic
from .signals import Interrupted, StopFlag

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "curves.png", "checkpoints")


class Diverged(Exception):
    """A non-finite loss: training stopped, the last good checkpoint kept."""


# ------------------------------------------------------------------------------------------ helpers
def default_workers(dataset: str) -> int:
    """In-memory generated data needs no workers; decoded datasets get up to 8, one core left over."""
    if dataset in GENERATED:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    kwargs = cfg.model_kwargs()
    kwargs.setdefault("in_chans", in_chans)
    attention = None if cfg.attention == "none" else cfg.attention
    return create_model(cfg.model, attention=attention, num_classes=num_classes, **kwargs)


def datasets_for(cfg: TrainConfig):
    """Train and validation sets and their DataInfo, as the run's configuration describes them."""
    return build_datasets(
        cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
        synthetic_train_size=cfg.synthetic_train_size, synthetic_val_size=cfg.synthetic_val_size,
        synthetic_seed=cfg.synthetic_seed, synthetic_classes=cfg.synthetic_classes, clutter=cfg.clutter,
        bad_images=cfg.bad_images,
    )


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Correct top-1 and top-5 predictions in a batch."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(target[:, None])
    return int(hit[:, :1].sum()), int(hit.any(dim=1).sum())


def make_optimizer(cfg: TrainConfig, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    lr = cfg.lr * (global_batch / cfg.lr_reference_batch if cfg.lr_reference_batch else 1.0)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a multiple of ``lr``; the schedule is per step.

    ``cosine`` anneals from the end of the warm-up to zero at the run's last step, whatever ``epochs`` is, so a
    3-epoch run ends annealed as a 200-epoch one does. ``step`` is the paper's: x ``gamma`` every ``step_size``
    epochs. ``constant`` stays. The warm-up rises linearly from 0.1 x to 1 x over ``warmup_epochs`` (see
    :func:`warmup_steps`).
    """
    warm = warmup_steps(cfg, steps_per_epoch)
    if step < warm:
        return 0.1 + 0.9 * step / warm
    if cfg.schedule == "step":
        return cfg.gamma ** (step // steps_per_epoch // cfg.step_size)
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return 1.0


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up steps: ``warmup_epochs`` x steps per epoch; unset, 5 % of the run under cosine and none otherwise."""
    if cfg.warmup_epochs is None:
        return round(0.05 * cfg.epochs * steps_per_epoch) if cfg.schedule == "cosine" else 0
    return round(cfg.warmup_epochs * steps_per_epoch)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A LambdaLR of :func:`lr_factor`, stepped after every optimizer step (its state is the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run worth protecting: a checkpoint or final weights. The leftovers of a start that
    failed before its first checkpoint (config.yaml, an empty metrics.jsonl, an empty checkpoints/) do not."""
    return (out / "model.safetensors").exists() or any((out / "checkpoints").glob("*.pt"))


def check_output(cfg: TrainConfig) -> list[str]:
    """Refuse to mix two runs in one folder unless --resume or --overwrite says what to do; with --resume,
    refuse settings that differ from the stored run's defining ones (see :func:`~cbam.train.config.check_resume`).

    Returns the run files already in the folder. A folder without a checkpoint is no run to protect: a failed
    start is simply started again.
    """
    out = check_output_path(cfg.output, "output")
    existing = [name for name in RUN_FILES if (out / name).is_file() or any((out / name).glob("*"))]
    if cfg.resume:
        if not (out / "checkpoints" / "last.pt").exists():
            hint = ("; it holds no checkpoint (a start that failed early), so run again without --resume to start "
                    "over" if existing else "")
            raise ValueError(f"--resume: no checkpoint to resume in {out} (expected {out}/checkpoints/last.pt){hint}")
        stored = stored_config(out)
        if stored is not None:
            check_resume(stored, cfg, str(out / "config.yaml"))
    elif existing and not cfg.overwrite and holds_run(out):
        raise ValueError(f"output folder {out} already holds a run ({', '.join(existing)}); "
                         "pass --resume to continue it or --overwrite to replace it")
    return existing


def prepare_output(cfg: TrainConfig, info: D.DistInfo) -> Path:
    """Check the output folder on every rank, then let rank 0 clear it (--overwrite, or the leftovers of a start
    that failed before its first checkpoint) and create it."""
    out = Path(cfg.output)
    existing = check_output(cfg)
    D.barrier(info)  # every rank has looked before rank 0 changes anything
    if info.is_main:
        if existing and not cfg.resume:
            if not cfg.overwrite:
                print(f"output {out} holds no checkpoint, only the start of a run that stopped early "
                      f"({', '.join(existing)}); starting it over", flush=True)
            for name in existing:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    return out


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A torn last line (a write cut short) is dropped and said so: the checkpoint,
    not this log, says where the run was. A bad line anywhere else is a ValueError naming the file and line."""
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not a metrics row")
        except ValueError:
            if k == len(lines) - 1:
                print(f"{path}: dropped a torn last line (line {n}, {len(line)} characters); "
                      "the checkpoint says where the run was", flush=True)
                break
            raise ValueError(f"{path}: line {n} is not a metrics row (JSON object with an epoch); fix or remove "
                             "that line") from None
        rows.append(row)
    return rows


def plot_curves(metrics: list[dict[str, Any]], path: Path) -> None:
    """Loss and error against epoch, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax1.plot(epochs, [m["val_loss"] for m in metrics], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [m["top1_err"] for m in metrics], "o-", label="top-1")
    ax2.plot(epochs, [m["top5_err"] for m in metrics], "o-", label="top-5")
    ax2.set(xlabel="epoch", ylabel="error (%)", title="validation error")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, cfg: TrainConfig, info: D.DistInfo) -> dict[str, float]:
    """Loss, top-1 and top-5 error (%) over the whole validation set, summed over ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, count
    for images, target in loader:
        images, target = _to_device(images, target, cfg, info.device)
        with autocast(cfg, info.device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        c1, c5 = accuracy_counts(logits, target)
        sums += torch.tensor([float(loss), c1, c5, len(target)], dtype=torch.float64)
    sums = D.all_reduce_sum(sums, info)
    n = max(sums[3].item(), 1.0)
    return {"val_loss": sums[0].item() / n, "top1_err": 100 * (1 - sums[1].item() / n),
            "top5_err": 100 * (1 - sums[2].item() / n), "val_images": int(sums[3].item())}


def _to_device(images, target, cfg: TrainConfig, device: torch.device):
    images = images.to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def _sync_buffers(model: nn.Module, info: D.DistInfo) -> None:
    """Give every rank rank 0's BatchNorm statistics (what is saved) before evaluating."""
    if info.distributed:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)


def eval_batch(global_batch: int, world_size: int) -> int:
    """Validation batch: the training batch rounded down to a multiple of the process count."""
    return max(world_size, global_batch - global_batch % world_size)


# ------------------------------------------------------------------------------------------ evaluation of a saved run
def load_run(path: str | Path) -> tuple[TrainConfig, dict[str, torch.Tensor], Path]:
    """A saved run's configuration and model weights, from a run folder, a checkpoint (.pt) or a .safetensors file.

    Returns (configuration, weights, the file read). A missing, corrupt or foreign file is a ValueError.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors" if (path / "model.safetensors").exists() else path / "checkpoints/last.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        config_file = path.parent / "config.yaml"
        if not config_file.exists():
            raise CheckpointError(f"{path}: expected the run's config.yaml beside it to rebuild the model")
        weights = load_weights(path)  # digest checked
        return from_dict(yaml.safe_load(config_file.read_text())), weights, path
    try:
        state = load_checkpoint(path)  # digest checked before anything is unpickled
    except CheckpointError as exc:
        prev = previous_path(path)
        if prev.is_file():
            raise CheckpointError(f"{exc}; the previous checkpoint {prev} can be evaluated instead") from None
        raise
    if "config" not in state:
        raise CheckpointError(f"checkpoint {path} holds no run configuration")
    return from_dict(state["config"]), state["model"], path


def evaluate_run(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 error and loss of a saved run on a validation set (by default the run's own).

    The weights are evaluated as saved, on the run's device setting; the result names the file and the run.
    """
    cfg, weights, path = load_run(checkpoint)
    updates = {"dataset": dataset, "data_dir": data_dir, "batch_size": batch_size, "workers": workers}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in updates.items() if v is not None})
    check_loader_settings(cfg)  # a typo like --workers 99999 would fork until memory runs out
    _, val_set, data = datasets_for(cfg)
    model = build_model(cfg, data.num_classes, data.in_chans)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {cfg.model} (attention {cfg.attention}): "
                              f"{str(exc).splitlines()[0]}") from None
    info = D.setup(cfg.device)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    workers = default_workers(cfg.dataset) if cfg.workers is None else cfg.workers
    loader = build_loader(val_set, batch_size=cfg.batch_size, train=False, workers=workers, seed=cfg.seed)
    return {"checkpoint": str(path), "model": cfg.model, "attention": cfg.attention, "dataset": cfg.dataset,
            **evaluate(model, loader, cfg, info)}


# ------------------------------------------------------------------------------------------ training state
StepHook = Callable[[dict[str, Any]], None]


@dataclass
class EpochTotals:
    """Running sums of the epoch so far; saved in checkpoints, so a resumed epoch reports what a straight one does."""

    loss_sum: float = 0.0  # summed per-image training loss
    images: float = 0.0
    seconds: float = 0.0  # training time, evaluation and checkpointing excluded

    def to_list(self) -> list[float]:
        """The checkpoint's ``epoch_sums`` entry (a list, as checkpoints have always held it)."""
        return [self.loss_sum, self.images, self.seconds]

    @classmethod
    def from_list(cls, values: list[float]) -> EpochTotals:
        """Totals from a checkpoint's ``epoch_sums``."""
        loss_sum, images, seconds = values
        return cls(loss_sum, images, seconds)


@dataclass
class Position:
    """Where a run stands: the next epoch and batch to train, optimizer steps taken, the best epoch so far."""

    epoch: int = 0
    batch: int = 0  # optimizer steps already taken in ``epoch`` (non-zero only when resuming mid-epoch)
    step: int = 0
    best: dict[str, Any] | None = None  # {"epoch", "top1_err", "top5_err"} of the best validation so far
    totals: EpochTotals = field(default_factory=EpochTotals)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's outcome, agreed on by every rank (one all-reduce)."""

    stop_requested: bool  # some rank received SIGINT / SIGTERM
    non_finite: bool  # some rank's loss was NaN or infinite
    loss_sum: float  # summed per-image loss over ranks
    images: float


@dataclass
class Run:
    """Everything a training run holds once set up: what the steps below share instead of a dozen locals."""

    cfg: TrainConfig
    info: D.DistInfo
    out: Path
    model: nn.Module  # the bare module: what is saved and evaluated
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    val_loader: DataLoader
    params: int
    macs: int
    on_step: StepHook | None = None
    num_classes: int = 0
    step_model: nn.Module | None = None  # what the training step calls (DDP- and compile-wrapped)
    tb: Any = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0

    @property
    def last_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "checkpoints" / "best.pt"


# ------------------------------------------------------------------------------------------ training
def train(cfg: TrainConfig, *, on_step: StepHook | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary that is also written to ``summary.json``.

    ``on_step`` is called after every optimizer step with the epoch, batch and step reached. Bad settings and
    data are ValueErrors; SIGINT / SIGTERM end in :class:`Interrupted`, a non-finite loss in :class:`Diverged`.
    """
    cfg.validate()  # every setting, the device and the output folder, before anything starts
    info = D.setup(cfg.device)
    try:
        with deterministic() if cfg.deterministic else contextlib.nullcontext():
            return _train(cfg, info, on_step)
    finally:
        D.cleanup()


def _train(cfg: TrainConfig, info: D.DistInfo, on_step: StepHook | None) -> dict[str, Any]:
    # a signal during set-up is kept too: the first step's all-reduce (agreed on by every rank) acts on it
    with StopFlag() as stop:
        run = _setup(cfg, info, on_step)
        position = _resume(run)
        _open_logs(run, position)
        _wrap_for_training(run)
        while position.epoch < cfg.epochs:
            _train_epoch(run, position, stop)
            row, is_best = _end_epoch(run, position)
            _log_epoch(run, row)
            _save_last(run, position, also_best=is_best)
        return _finish(run, position)


def fuse_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    """Fused blocks pay on the CPU (their kernels are CPU kernels); on other devices only to save memory."""
    return cfg.fuse and (device.type == "cpu" or cfg.memory_efficient)


def _setup(cfg: TrainConfig, info: D.DistInfo, on_step: StepHook | None) -> Run:
    """Seed, data, model (fused where wanted), optimizer; then the output folder, once all of that is known to work."""
    torch.manual_seed(cfg.seed)
    check_output(cfg)  # refuse early; the folder itself is made once data and model are known to be fine
    train_set, val_set, data = datasets_for(cfg)
    workers = default_workers(cfg.dataset) if cfg.workers is None else cfg.workers
    ranks = {"rank": info.rank, "world_size": info.world_size}
    train_loader = build_loader(train_set, batch_size=cfg.batch_size, train=True, workers=workers, seed=cfg.seed,
                                accum_steps=cfg.accum_steps, **ranks)
    val_loader = build_loader(val_set, batch_size=eval_batch(cfg.batch_size, info.world_size), train=False,
                              workers=workers, seed=cfg.seed, **ranks)

    model = build_model(cfg, data.num_classes, data.in_chans)
    if cfg.attention != "none" and cfg.attention_init == "identity":
        init_attention(model, "identity")  # identity: start as the plain network (docs/demo.md)
    params = count_params(model)
    with torch.device("meta"):
        macs = count_macs(build_model(cfg, data.num_classes, data.in_chans), input_size=(data.image_size,) * 2,
                          in_chans=data.in_chans)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    _fuse(model, cfg, info)
    optimizer = make_optimizer(cfg, model, cfg.batch_size)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch(cfg, train_loader))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
    out = prepare_output(cfg, info)
    return Run(cfg=cfg, info=info, out=out, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               train_loader=train_loader, val_loader=val_loader, params=params, macs=macs, on_step=on_step,
               num_classes=data.num_classes)


def steps_per_epoch(cfg: TrainConfig, loader) -> int:
    """Optimizer steps in one epoch: the sampler's batches, capped by ``max_steps_per_epoch``."""
    n = loader.sampler.batches_per_epoch
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def _fuse(model: nn.Module, cfg: TrainConfig, info: D.DistInfo) -> list[str]:
    """Apply ``cbam.fuse`` where it is wanted and say what it did (one line, rank 0)."""
    if not fuse_wanted(cfg, info.device):
        why = "fuse: false" if not cfg.fuse else f"the fused kernels are for the CPU, this run is on {info.device}"
        if info.is_main:
            print(f"fusion off ({why}); the blocks run unfused", flush=True)
        return []
    changed = fuse(model, memory_efficient=cfg.memory_efficient)
    if info.is_main:
        how = ", recomputing activations in backward" if cfg.memory_efficient else ""
        print(f"fused {len(changed)} block(s) with cbam.fuse{how}", flush=True)
    return changed


def _resume(run: Run) -> Position:
    """The position to start from: the beginning, or everything ``last.pt`` saved (states, sums, RNGs)."""
    if not run.cfg.resume:
        return Position()
    info = run.info
    state, last_path, fell_back = load_checkpoint_or_previous(run.last_path)  # digests checked
    if fell_back and info.is_main:
        print(fell_back, flush=True)
    _check_run_config(run, state, last_path)
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        raise CheckpointError(f"checkpoint {last_path} does not fit this run's model or optimizer ({reason}); "
                              "resume with the run's own settings") from None
    if "lr_lambdas" not in state["scheduler"]:  # a per-epoch scheduler's state: saved before the per-step schedule
        raise CheckpointError(f"checkpoint {last_path} was saved by an older version whose learning-rate schedule "
                              "advanced once per epoch; it cannot continue under the per-step schedule: start a new "
                              "--output")
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    position = Position(epoch=state["epoch"], batch=state["batch"], step=state["step"], best=state.get("best"),
                        totals=EpochTotals.from_list(list(state["epoch_sums"])))
    set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
    if info.is_main:
        print(f"resuming {last_path}: epoch {position.epoch + 1}, batch {position.batch}, step {position.step}",
              flush=True)
    return position


def _check_run_config(run: Run, state: dict[str, Any], path: Path) -> None:
    """The run's defining settings must be the checkpoint's; allowed changes (more epochs, workers, ...) are logged.

    config.yaml is compared before any work (:func:`check_output`); this compares with the checkpoint itself,
    which is what the weights were trained with. See :data:`~cbam.train.config.MAY_CHANGE`.
    """
    allowed = check_resume(state["config"], run.cfg, str(path)) if "config" in state else []
    if state.get("epoch", 0) > run.cfg.epochs:
        raise ValueError(f"--resume: epochs {run.cfg.epochs} is fewer than the {state['epoch']} the run in "
                         f"{run.out} has already trained")
    if allowed and run.info.is_main:
        print(f"resume: changed settings applied (config.yaml updated): {'; '.join(allowed)}", flush=True)


def _open_logs(run: Run, position: Position) -> None:
    """Rank 0 writes config.yaml and drops metrics of epochs after the resumed one; TensorBoard opens."""
    if run.info.is_main:
        (run.out / "config.yaml").write_text(to_yaml(run.cfg))
        kept = [m for m in _read_metrics(run.out / "metrics.jsonl") if m["epoch"] <= position.epoch]
        (run.out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))


def _wrap_for_training(run: Run) -> None:
    """DDP (after resuming: it broadcasts rank 0's weights) and torch.compile around the model; logs opened."""
    cfg, info = run.cfg, run.info
    step_model: nn.Module = run.model
    if info.distributed:
        step_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)
    run.step_model = step_model
    run.tb = _tensorboard(cfg, run.out) if info.is_main else None
    run.metrics = _read_metrics(run.out / "metrics.jsonl") if info.is_main else []
    run.started = time.time()


def _train_epoch(run: Run, position: Position, stop: StopFlag) -> None:
    """Optimizer steps from ``position.batch`` to the epoch's end, saving when asked or when stopped."""
    cfg, info = run.cfg, run.info
    sampler = run.train_loader.sampler
    sampler.set_epoch(position.epoch, position.batch)
    n_batches = steps_per_epoch(cfg, run.train_loader)
    run.model.train()
    bar = _progress(cfg, info, n_batches, position.batch, position.epoch)
    t0 = time.time()
    micro_batches = iter(run.train_loader)
    while position.batch < n_batches:
        result = _train_step(run, micro_batches, stop)
        if result.non_finite:
            run.optimizer.zero_grad(set_to_none=True)
            where = run.last_path if run.last_path.exists() else "none written yet"
            raise Diverged(f"non-finite loss at epoch {position.epoch + 1}, batch {position.batch + 1} (step "
                           f"{position.step + 1}); stopped, weights not updated; last good checkpoint: {where}")
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        position.step += 1
        position.batch += 1
        position.totals.loss_sum += result.loss_sum
        position.totals.images += result.images
        if bar is not None:
            elapsed = position.totals.seconds + time.time() - t0
            bar.set_postfix(loss=f"{result.loss_sum / max(result.images, 1):.3f}",
                            img_s=f"{position.totals.images / max(elapsed, 1e-9):.0f}")
            bar.update(1)
        if run.on_step is not None:
            run.on_step({"epoch": position.epoch, "batch": position.batch, "step": position.step})
        periodic = (cfg.save_every_steps and position.step % cfg.save_every_steps == 0
                    and position.batch < n_batches)
        if result.stop_requested or periodic:
            position.totals.seconds += time.time() - t0
            t0 = time.time()
            path = _save_last(run, position)
            if result.stop_requested:
                if bar is not None:
                    bar.close()
                raise Interrupted(stop.signum or signal.SIGTERM, path if info.is_main else None)
    if bar is not None:
        bar.close()
    del micro_batches
    position.totals.seconds += time.time() - t0


def _train_step(run: Run, micro_batches: Iterator[Any], stop: StopFlag) -> StepResult:
    """Forward and backward over one step's micro-batches (gradients accumulated), then one all-reduce of the
    loss, the image count and the stop / non-finite flags, so that every rank takes the same decision."""
    cfg, info = run.cfg, run.info
    loss_sum, n_images = 0.0, 0
    for k in range(cfg.accum_steps):
        images, target = _to_device(*next(micro_batches), cfg, info.device)
        sync = k == cfg.accum_steps - 1 or not info.distributed
        ctx = contextlib.nullcontext() if sync else run.step_model.no_sync()
        with ctx, autocast(cfg, info.device):
            loss = F.cross_entropy(run.step_model(images).float(), target, label_smoothing=cfg.label_smoothing)
            run.scaler.scale(loss / cfg.accum_steps).backward()
        loss_sum += float(loss.detach()) * len(target)
        n_images += len(target)
    stop_flag, non_finite, loss_total, images_total = D.all_reduce_sum(
        torch.tensor([float(stop.signum > 0), float(not math.isfinite(loss_sum)), loss_sum, n_images],
                     dtype=torch.float64), info).tolist()
    return StepResult(stop_requested=stop_flag > 0, non_finite=non_finite > 0, loss_sum=loss_total,
                      images=images_total)


def _end_epoch(run: Run, position: Position) -> tuple[dict[str, Any], bool]:
    """Validation, the epoch's metrics row (``lr``: the last step's); ``position`` moves to the next epoch's start."""
    totals = position.totals
    lr_used = run.scheduler.get_last_lr()[0] if position.step == 0 else _lr_of_step(run, position.step - 1)
    _sync_buffers(run.model, run.info)
    val = evaluate(run.model, run.val_loader, run.cfg, run.info)  # the bare module: no collective per batch
    row = {"epoch": position.epoch + 1, "step": position.step,
           "train_loss": totals.loss_sum / max(totals.images, 1), **val,
           "lr": lr_used,
           "seconds": totals.seconds, "images_per_s": totals.images / max(totals.seconds, 1e-9)}
    is_best = position.best is None or val["top1_err"] < position.best["top1_err"]
    if is_best:
        position.best = {"epoch": position.epoch + 1, "top1_err": val["top1_err"], "top5_err": val["top5_err"]}
    position.epoch += 1
    position.batch = 0
    position.totals = EpochTotals()
    return row, is_best


def _lr_of_step(run: Run, step: int) -> float:
    return run.scheduler.base_lrs[0] * lr_factor(run.cfg, step, steps_per_epoch(run.cfg, run.train_loader))


def _log_epoch(run: Run, row: dict[str, Any]) -> None:
    """Rank 0 appends the row to metrics.jsonl, prints it and sends it to TensorBoard."""
    if not run.info.is_main:
        return
    run.metrics.append(row)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"epoch {row['epoch']}/{run.cfg.epochs}: train loss {row['train_loss']:.4f}  val loss "
          f"{row['val_loss']:.4f}  top-1 err {row['top1_err']:.2f}%  top-5 err {row['top5_err']:.2f}%  "
          f"{row['images_per_s']:.0f} img/s", flush=True)
    if run.tb is not None:
        for key in ("train_loss", "val_loss", "top1_err", "top5_err", "lr", "images_per_s"):
            run.tb.add_scalar(key, row[key], row["epoch"])


def _checkpoint_state(run: Run, position: Position) -> dict[str, Any]:
    """Everything a resume needs, with every rank's RNG state (a collective: all ranks must call it)."""
    info = run.info
    rngs = [rng_state()]
    if info.distributed:
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": position.epoch,
            "batch": position.batch, "step": position.step, "best": position.best,
            "epoch_sums": position.totals.to_list(), "rng": rngs,
            "config": {k: v for k, v in asdict(run.cfg).items() if k != "config"}}


def _save_last(run: Run, position: Position, *, also_best: bool = False) -> Path:
    """Save ``last.pt`` (and ``best.pt``) at ``position``; every rank takes part, rank 0 writes."""
    state = _checkpoint_state(run, position)
    if run.info.is_main:
        save_checkpoint(run.last_path, state, keep_previous=True)  # last.prev.pt: the fallback if last.pt goes bad
        if also_best:
            save_checkpoint(run.best_path, state)
    return run.last_path


def _finish(run: Run, position: Position) -> dict[str, Any]:
    """Rank 0 writes the final weights, summary.json and the curves; returns the summary ({} elsewhere)."""
    cfg, info, metrics, best = run.cfg, run.info, run.metrics, position.best
    bad_images = _bad_images_skipped(run)  # a collective under the launcher: before rank 0 goes its own way
    if not info.is_main:
        return {}
    if bad_images:
        print(f"skipped {len(bad_images)} unreadable image(s) (--bad-images skip), each named above", flush=True)
    final = metrics[-1] if metrics else {}
    summary = {
        "model": cfg.model, "attention": cfg.attention, "dataset": cfg.dataset, "epochs": cfg.epochs,
        "num_classes": run.num_classes,
        "final_top1_err": final.get("top1_err"), "final_top5_err": final.get("top5_err"),
        "final_val_loss": final.get("val_loss"),
        "best_top1_err": best["top1_err"] if best else None, "best_top5_err": best["top5_err"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "params": run.params, "gmacs": run.macs / 1e9, "images_per_s": final.get("images_per_s"),
        "wall_time_s": sum(m["seconds"] for m in metrics), "session_time_s": time.time() - run.started,
        "world_size": info.world_size, "bad_images_skipped": len(bad_images),
    }
    save_weights(run.out / "model.safetensors", run.model, metadata={"model": cfg.model, "attention": cfg.attention})
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if metrics:
        plot_curves(metrics, run.out / "curves.png")
    if run.tb is not None:
        run.tb.close()
    return summary


def _bad_images_skipped(run: Run) -> list[str]:
    """Paths of the unreadable images skipped (``--bad-images skip``) in this session, over every rank."""
    paths: set[str] = set()
    for loader in (run.train_loader, run.val_loader):
        dataset = getattr(loader.dataset, "dataset", loader.dataset)
        paths.update(getattr(dataset, "skipped", ()))
    if run.info.distributed:
        gathered: list[Any] = [None] * run.info.world_size
        torch.distributed.all_gather_object(gathered, sorted(paths))
        paths = {p for rank_paths in gathered for p in rank_paths}
    return sorted(paths)


def _progress(cfg: TrainConfig, info: D.DistInfo, total: int, initial: int, epoch: int):
    if not (cfg.progress and info.is_main):
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                dynamic_ncols=True, leave=False)


def _tensorboard(cfg: TrainConfig, out: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: logging to metrics.jsonl only
        return None
    return SummaryWriter(str(out / "tensorboard"))
