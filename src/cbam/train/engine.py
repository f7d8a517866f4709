"""The training engine behind ``cbam train``: one process or many, resumable to the exact step.

What makes a resumed run end bit-identical to an uninterrupted one: the sample order and each sample's
augmentation are functions of (seed, epoch, index) (``sampler.py``); the checkpoint holds model,
optimizer, scheduler, AMP scaler, epoch, step within the epoch, the epoch's running sums and every RNG
state; checkpoints are replaced atomically. SIGINT / SIGTERM set a flag that the loop checks after each
step: it saves, says where, and leaves with exit code 130 / 143.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import UsageError
from ..models import create_model
from ..models.complexity import count_macs, count_params
from . import distributed as D
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, save_weights, set_rng_state
from .config import TrainConfig, to_yaml
from .data import build_datasets, build_loader

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "curves.png", "checkpoints")


class Interrupted(Exception):
    """Training stopped by SIGINT / SIGTERM after saving; ``exit_code`` is 128 + signal number."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        where = f"; saved {checkpoint}, continue with --resume" if checkpoint else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{where}")


class Diverged(Exception):
    """A non-finite loss: training stopped, the last good checkpoint kept."""


# ------------------------------------------------------------------------------------------ helpers
def default_workers(dataset: str) -> int:
    """In-memory synthetic data needs no workers; decoded datasets get up to 8, one core left over."""
    if dataset == "synthetic":
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
        synthetic_seed=cfg.synthetic_seed, synthetic_classes=cfg.synthetic_classes, bad_images=cfg.bad_images,
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


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """Stepped once per epoch: step decay (the paper's x0.1 every 30), cosine, or constant; optional warm-up."""
    main_epochs = max(1, cfg.epochs - cfg.warmup_epochs)
    if cfg.schedule == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs)
    else:
        main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if cfg.warmup_epochs <= 0:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=cfg.warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[cfg.warmup_epochs])


def check_output(cfg: TrainConfig) -> list[str]:
    """Refuse to mix two runs in one folder unless --resume or --overwrite says what to do."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    existing = [name for name in RUN_FILES if (out / name).is_file() or any((out / name).glob("*"))]
    if cfg.resume:
        if not (out / "checkpoints" / "last.pt").exists():
            raise UsageError(f"--resume: no checkpoint to resume in {out} (expected {out}/checkpoints/last.pt)")
    elif existing and not cfg.overwrite:
        raise UsageError(f"output folder {out} already holds a run ({', '.join(existing)}); "
                         "pass --resume to continue it or --overwrite to replace it")
    return existing


def prepare_output(cfg: TrainConfig, info: D.DistInfo) -> Path:
    """Check the output folder on every rank, then let rank 0 clear (--overwrite) and create it."""
    out = Path(cfg.output)
    existing = check_output(cfg)
    D.barrier(info)  # every rank has looked before rank 0 changes anything
    if info.is_main:
        if cfg.overwrite and not cfg.resume:
            for name in existing:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    return out


class _StopFlag:
    """SIGINT / SIGTERM handlers that only raise a flag; the loop acts on it at a safe point."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics: list[dict[str, Any]], path: Path) -> None:
    """Loss and error against epoch, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

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


# ------------------------------------------------------------------------------------------ training
StepHook = Callable[[dict[str, Any]], None]


def train(cfg: TrainConfig, *, on_step: StepHook | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary that is also written to ``summary.json``."""
    info = D.setup(cfg.device)
    try:
        return _train(cfg, info, on_step)
    finally:
        D.cleanup()


def _train(cfg: TrainConfig, info: D.DistInfo, on_step: StepHook | None) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    check_output(cfg)  # refuse early; the folder itself is made once data and model are known to be fine
    train_set, val_set, data = datasets_for(cfg)
    global_batch = cfg.batch_size
    workers = default_workers(cfg.dataset) if cfg.workers is None else cfg.workers
    ranks = {"rank": info.rank, "world_size": info.world_size}
    train_loader = build_loader(train_set, batch_size=global_batch, train=True, workers=workers, seed=cfg.seed,
                                accum_steps=cfg.accum_steps, **ranks)
    val_loader = build_loader(val_set, batch_size=eval_batch(global_batch, info.world_size), train=False,
                              workers=workers, seed=cfg.seed, **ranks)
    train_sampler = train_loader.sampler

    model = build_model(cfg, data.num_classes, data.in_chans)
    params = count_params(model)
    with torch.device("meta"):
        macs = count_macs(build_model(cfg, data.num_classes, data.in_chans), input_size=(data.image_size,) * 2,
                          in_chans=data.in_chans)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, global_batch)
    scheduler = make_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
    out = prepare_output(cfg, info)

    # resume
    start_epoch, start_batch, global_step, best = 0, 0, 0, None
    epoch_sums = [0.0, 0.0, 0.0]  # loss sum, images, seconds of the epoch so far
    last_path, best_path = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    if cfg.resume:
        state = load_checkpoint(last_path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0][:160]
            raise CheckpointError(f"checkpoint {last_path} does not fit this run's model or optimizer ({reason}); "
                                  "resume with the run's own settings") from None
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, global_step = state["epoch"], state["batch"], state["step"]
        best, epoch_sums = state.get("best"), list(state["epoch_sums"])
        set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
        if info.is_main:
            print(f"resuming {last_path}: epoch {start_epoch + 1}, batch {start_batch}, step {global_step}",
                  flush=True)
    if info.is_main:
        (out / "config.yaml").write_text(to_yaml(cfg))
        kept = [m for m in _read_metrics(out / "metrics.jsonl") if m["epoch"] <= start_epoch]
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))

    step_model: nn.Module = model
    if info.distributed:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)
    tb = _tensorboard(cfg, out) if info.is_main else None

    def checkpoint_state(epoch: int, batch: int) -> dict[str, Any]:
        rngs = [rng_state()]
        if info.distributed:
            gathered: list[Any] = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "batch": batch, "step": global_step, "best": best, "epoch_sums": epoch_sums, "rng": rngs,
                "config": {k: v for k, v in asdict(cfg).items() if k != "config"}}

    def save_last(epoch: int, batch: int, *, also_best: bool = False) -> Path:
        state = checkpoint_state(epoch, batch)  # collective: every rank takes part
        if info.is_main:
            save_checkpoint(last_path, state)
            if also_best:
                save_checkpoint(best_path, state)
        return last_path

    metrics: list[dict[str, Any]] = _read_metrics(out / "metrics.jsonl") if info.is_main else []
    started = time.time()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            train_sampler.set_epoch(epoch, start_batch)
            n_batches = train_sampler.batches_per_epoch
            if cfg.max_steps_per_epoch:
                n_batches = min(n_batches, cfg.max_steps_per_epoch)
            model.train()
            bar = _progress(cfg, info, n_batches, start_batch, epoch)
            t0 = time.time()
            batch_idx = start_batch
            micro_iter = iter(train_loader)
            while batch_idx < n_batches:
                loss_sum, n_images = 0.0, 0
                for k in range(cfg.accum_steps):
                    images, target = _to_device(*next(micro_iter), cfg, info.device)
                    sync = k == cfg.accum_steps - 1 or not info.distributed
                    ctx = contextlib.nullcontext() if sync else step_model.no_sync()
                    with ctx, autocast(cfg, info.device):
                        loss = F.cross_entropy(step_model(images).float(), target,
                                               label_smoothing=cfg.label_smoothing)
                        scaler.scale(loss / cfg.accum_steps).backward()
                    loss_sum += float(loss.detach()) * len(target)
                    n_images += len(target)
                flags = D.all_reduce_sum(torch.tensor([float(stop.signum > 0), float(not math.isfinite(loss_sum)),
                                                       loss_sum, n_images], dtype=torch.float64), info)
                if flags[1] > 0:
                    optimizer.zero_grad(set_to_none=True)
                    where = last_path if last_path.exists() else "none written yet"
                    raise Diverged(f"non-finite loss at epoch {epoch + 1}, batch {batch_idx + 1} (step "
                                   f"{global_step + 1}); stopped, weights not updated; last good checkpoint: {where}")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                batch_idx += 1
                epoch_sums[0] += flags[2].item()
                epoch_sums[1] += flags[3].item()
                if bar is not None:
                    elapsed = epoch_sums[2] + time.time() - t0
                    bar.set_postfix(loss=f"{flags[2].item() / max(flags[3].item(), 1):.3f}",
                                    img_s=f"{epoch_sums[1] / max(elapsed, 1e-9):.0f}")
                    bar.update(1)
                if on_step is not None:
                    on_step({"epoch": epoch, "batch": batch_idx, "step": global_step})
                stop_now = flags[0] > 0
                if stop_now or (cfg.save_every_steps and global_step % cfg.save_every_steps == 0
                                and batch_idx < n_batches):
                    epoch_sums[2] += time.time() - t0
                    t0 = time.time()
                    path = save_last(epoch, batch_idx)
                    if stop_now:
                        if bar is not None:
                            bar.close()
                        raise Interrupted(stop.signum or signal.SIGTERM, path if info.is_main else None)
            if bar is not None:
                bar.close()
            del micro_iter
            epoch_sums[2] += time.time() - t0
            lr_used = optimizer.param_groups[0]["lr"]
            scheduler.step()
            _sync_buffers(model, info)
            val = evaluate(model, val_loader, cfg, info)  # the bare module: no collective per batch
            row = {"epoch": epoch + 1, "step": global_step,
                   "train_loss": epoch_sums[0] / max(epoch_sums[1], 1), **val,
                   "lr": lr_used,
                   "seconds": epoch_sums[2], "images_per_s": epoch_sums[1] / max(epoch_sums[2], 1e-9)}
            is_best = best is None or val["top1_err"] < best["top1_err"]
            if is_best:
                best = {"epoch": epoch + 1, "top1_err": val["top1_err"], "top5_err": val["top5_err"]}
            epoch_sums = [0.0, 0.0, 0.0]
            start_batch = 0
            if info.is_main:
                metrics.append(row)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}  val loss "
                      f"{val['val_loss']:.4f}  top-1 err {val['top1_err']:.2f}%  top-5 err {val['top5_err']:.2f}%  "
                      f"{row['images_per_s']:.0f} img/s", flush=True)
                if tb is not None:
                    for key in ("train_loss", "val_loss", "top1_err", "top5_err", "lr", "images_per_s"):
                        tb.add_scalar(key, row[key], epoch + 1)
            save_last(epoch + 1, 0, also_best=is_best)
    return _finish(cfg, info, out, model, metrics, best, params, macs, started, tb)


def _finish(cfg, info, out, model, metrics, best, params, macs, started, tb) -> dict[str, Any]:
    if not info.is_main:
        return {}
    final = metrics[-1] if metrics else {}
    summary = {
        "model": cfg.model, "attention": cfg.attention, "dataset": cfg.dataset, "epochs": cfg.epochs,
        "final_top1_err": final.get("top1_err"), "final_top5_err": final.get("top5_err"),
        "final_val_loss": final.get("val_loss"),
        "best_top1_err": best["top1_err"] if best else None, "best_top5_err": best["top5_err"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "params": params, "gmacs": macs / 1e9, "images_per_s": final.get("images_per_s"),
        "wall_time_s": sum(m["seconds"] for m in metrics), "session_time_s": time.time() - started,
        "world_size": info.world_size,
    }
    save_weights(out / "model.safetensors", model, metadata={"model": cfg.model, "attention": cfg.attention})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if metrics:
        plot_curves(metrics, out / "curves.png")
    if tb is not None:
        tb.close()
    return summary


def _progress(cfg: TrainConfig, info: D.DistInfo, total: int, initial: int, epoch: int):
    if not (cfg.progress and info.is_main):
        return None
    from tqdm.auto import tqdm

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
