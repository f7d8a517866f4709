"""``cbam train`` and ``cbam eval``: flags generated from :class:`TrainConfig`, so YAML and flags agree."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..options import ATTENTION_CHOICES
from . import distributed as D
from .checkpoint import load_checkpoint
from .config import TrainConfig, from_dict, resolve
from .data import DATASETS

_CHOICES = {"attention": ATTENTION_CHOICES, "dataset": DATASETS, "amp": ("bf16", "fp16"),
            "schedule": ("step", "cosine", "constant"), "bad_images": ("stop", "skip"),
            "arrangement": ("channel_first", "spatial_first", "parallel"), "preset": ("paper", "seed", "timm"),
            "spatial_compress": ("pool", "conv")}
_HELP = {
    "model": "registered model (cbam profile --list)", "attention": "attention module",
    "dataset": "data set", "data_dir": "folder in torchvision's layout", "download": "fetch the data set (online)",
    "epochs": "epochs", "batch_size": "global batch size (over all processes)", "lr": "learning rate",
    "lr_reference_batch": "scale lr by batch_size / this (linear scaling rule)",
    "output": "run folder", "config": "recipe name (imagenet, cifar, demo) or YAML file",
    "resume": "continue from OUTPUT/checkpoints/last.pt", "overwrite": "replace the run in OUTPUT",
    "amp": "mixed precision", "channels_last": "channels_last memory format", "compile": "torch.compile the model",
    "seed": "random seed", "workers": "data loader workers (default: 0 for synthetic, else up to 8)",
    "accum_steps": "gradient accumulation steps", "save_every_steps": "also save last.pt every N steps",
    "pool_types": "channel pools, comma-separated (avg,max,lp,lse)", "spatial": "spatial gate (--no-spatial: off)",
    "max_steps_per_epoch": "cap on optimizer steps per epoch (quick experiments)",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": None, "help": _HELP.get(f.name, f.name.replace("_", " "))}
        base = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        kind = base[0]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(kind) is list:
            kind = str
        kwargs["type"] = kind
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="launch torchrun with N processes on this machine")


def run_train(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command",)}
    nproc = values.pop("nproc_per_node", None)
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {nproc}")
    cfg = resolve(values)
    from .engine import Diverged, Interrupted, check_output, train

    if nproc is not None:
        check_output(cfg)  # refuse bad input here, in one line, rather than in every child process
        from ..models import list_models

        if cfg.model not in list_models():
            raise UsageError(f"unknown model {cfg.model!r}; see cbam profile --list")
        return D.launch_torchrun(nproc, _strip_flag(args._argv, "--nproc-per-node"))

    try:
        summary = train(cfg)
    except Interrupted as exc:
        print(f"cbam train: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Diverged as exc:
        print(f"cbam train: error: {exc}", file=sys.stderr, flush=True)
        return 3
    if summary:
        print(f"done: top-1 err {summary['final_top1_err']:.2f}%, top-5 err {summary['final_top5_err']:.2f}% "
              f"(best top-1 {summary['best_top1_err']:.2f}% at epoch {summary['best_epoch']}); "
              f"outputs in {cfg.output}")
    return 0


def _strip_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


# ------------------------------------------------------------------------------------------ eval
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder, a checkpoint (.pt) or final weights (model.safetensors) of a run")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="default: the run's data set")
    parser.add_argument("--data-dir", default=None, help="default: the run's data folder")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--output", default=None, help="JSON file for the results (default: beside the weights)")


def _load_for_eval(path: Path) -> tuple[TrainConfig, dict[str, torch.Tensor], Path]:
    """The run's configuration and the model weights, from a run folder, a .pt or a .safetensors file."""
    if path.is_dir():
        path = path / "model.safetensors" if (path / "model.safetensors").exists() else path / "checkpoints/last.pt"
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_file = path.parent / "config.yaml"
        if not config_file.exists():
            raise UsageError(f"{path}: expected the run's config.yaml beside it to rebuild the model")
        import yaml

        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"weights {path} are corrupt or truncated ({exc})") from None
        return from_dict(yaml.safe_load(config_file.read_text())), weights, path
    state = load_checkpoint(path)
    if "config" not in state:
        raise UsageError(f"checkpoint {path} holds no run configuration")
    return from_dict(state["config"]), state["model"], path


def run_eval(args: argparse.Namespace) -> int:
    from .engine import build_model, datasets_for, evaluate

    cfg, weights, path = _load_for_eval(Path(args.checkpoint))
    updates = {"dataset": args.dataset, "data_dir": args.data_dir, "batch_size": args.batch_size,
               "workers": args.workers}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in updates.items() if v is not None})
    _, val_set, data = datasets_for(cfg)
    model = build_model(cfg, data.num_classes, data.in_chans)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UsageError(f"{path} does not fit {cfg.model} (attention {cfg.attention}): "
                         f"{str(exc).splitlines()[0]}") from None
    info = D.setup(cfg.device)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    from .data import build_loader
    from .engine import default_workers

    workers = default_workers(cfg.dataset) if cfg.workers is None else cfg.workers
    loader = build_loader(val_set, batch_size=cfg.batch_size, train=False, workers=workers, seed=cfg.seed)
    result = {"checkpoint": str(path), "model": cfg.model, "attention": cfg.attention, "dataset": cfg.dataset,
              **evaluate(model, loader, cfg, info)}
    out = Path(args.output) if args.output else path.parent / f"eval_{cfg.dataset}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cfg.model} ({cfg.attention}) on {cfg.dataset} val, {result['val_images']} images: "
          f"top-1 err {result['top1_err']:.2f}%  top-5 err {result['top5_err']:.2f}%  loss {result['val_loss']:.4f}")
    print(f"written to {out}")
    return 0
