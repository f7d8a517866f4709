"""``cbam train`` and ``cbam eval``: one flag per :class:`TrainConfig` key, so YAML recipes and flags agree.

Every flag defaults to "unset" so that the layering defaults < ``--config`` recipe < flags works; the help
shows the value an unset key takes without a recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from ..insertion import INITS
from ..layers import ARRANGEMENTS, PRESETS
from ..train import distributed as D
from ..train.config import TrainConfig, check_output_path, resolve
from ..train.data import BAD_IMAGE_POLICIES, DATASETS
from ..train.engine import Diverged, Interrupted, check_output, evaluate_run, train
from .options import ATTENTION_CHOICES, MODEL_HELP, at_least
from .runtime import stopped

CHOICES: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_CHOICES, "dataset": DATASETS, "amp": ("bf16", "fp16"),
    "schedule": ("step", "cosine", "constant"), "attention_init": INITS, "bad_images": BAD_IMAGE_POLICIES,
    "arrangement": ARRANGEMENTS, "preset": tuple(PRESETS), "spatial_compress": ("pool", "conv"),
}

# TrainConfig key -> help: what it does and its unit; " (default: ...)" is added from TrainConfig unless the
# text already says it (keys whose unset value means "the model's / the data set's choice")
HELP: dict[str, str] = {
    # model
    "model": "registered network (list: cbam profile --list)",
    **{key: MODEL_HELP[key] for key in ("attention", "reduction", "kernel_size", "arrangement", "preset",
                                        "spatial_compress", "spatial", "widen", "width_mult", "stride_in_1x1",
                                        "in_chans")},
    "pool_types": MODEL_HELP["pool_types"],
    "attention_init": "identity: the attention modules start as constant gates with the norm in front scaled to undo "
                      "them, so the network starts as the plain one (trains well in short runs, docs/demo.md); "
                      "paper: the modules' own initialisation (the paper's recipes); BAM, between the stages, "
                      "always keeps its own",
    # data
    "dataset": "data set (synthetic and cluttered-digits ship with the package: no files, no download)",
    "data_dir": "folder holding the data set in torchvision's layout (default: none; needed for all but synthetic and "
                "cluttered-digits)",
    "download": "fetch the data set into --data-dir (needs network access)",
    "image_size": "side of the training and validation crops, in pixels (default: the data set's)",
    "bad_images": "an unreadable image file: stop with its name, or skip it and list it",
    "synthetic_train_size": "training images of the generated data sets (synthetic, cluttered-digits)",
    "synthetic_val_size": "validation images of the generated data sets (synthetic, cluttered-digits)",
    "synthetic_seed": "seed of the generated images (the data, not the training)",
    "synthetic_classes": "classes of the synthetic data set",
    "clutter": "digit fragments scattered on each cluttered-digits canvas",
    "workers": "data-loader worker processes (default: 0 for generated data, else up to 8)",
    # optimisation
    "epochs": "training epochs",
    "batch_size": "images per optimizer step, over all processes and accumulation steps",
    "lr": "initial SGD learning rate (per --lr-reference-batch images when that is set)",
    "lr_reference_batch": "scale lr by batch_size / this many images, the linear scaling rule (default: no scaling)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay (L2 penalty coefficient)",
    "nesterov": "Nesterov momentum",
    "schedule": "learning-rate schedule, set at every optimizer step: cosine anneals to 0 at the run's end whatever "
                "--epochs is; step multiplies by --gamma every --step-size epochs (the paper's ImageNet recipe)",
    "step_size": "epochs between two decays of the step schedule",
    "gamma": "factor applied to the learning rate at each decay of the step schedule",
    "warmup_epochs": "epochs (fractions allowed) of linear warm-up from 0.1 x lr, before the schedule "
                     "(default: 5 %% of the run under cosine, none otherwise)",
    "label_smoothing": "label smoothing of the cross-entropy loss, between 0 and 1",
    "accum_steps": "micro-batches whose gradients are summed per optimizer step (gradient accumulation)",
    # numerics and speed
    "amp": "mixed precision: bf16 or fp16 autocast (default: off, float32)",
    "channels_last": "channels_last memory format for the model and the images",
    "compile": "torch.compile the model for training",
    "fuse": "apply cbam.fuse (fused CBAM blocks, same function, faster) on the CPU, or on any device with "
            "--memory-efficient; --no-fuse keeps the plain blocks",
    "memory_efficient": "fused blocks recompute activations in backward instead of saving them (less memory, "
                        "some time); fuses on any device",
    "deterministic": "torch.use_deterministic_algorithms(True) and deterministic cuDNN: a rerun gives the same weights "
                     "(an operator without a deterministic version raises; see docs/export.md)",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    # run management
    "seed": "random seed of initialisation, sample order and augmentation",
    "output": "run folder (config.yaml, metrics.jsonl, checkpoints/, model.safetensors)",
    "resume": "continue the run in --output from its checkpoints/last.pt",
    "overwrite": "replace the run already in --output",
    "save_every_steps": "also save checkpoints/last.pt every N optimizer steps (0: only at the end of each epoch)",
    "max_steps_per_epoch": "cap on optimizer steps per epoch, for quick experiments (default: no cap)",
    "progress": "progress bar",
    "tensorboard": "TensorBoard logs in OUTPUT/tensorboard (when tensorboard is installed)",
    "config": "recipe name (imagenet, cifar, demo) or YAML file; its keys replace the defaults shown here and "
              "flags replace its keys (default: none)",
}


def _help(field: dataclasses.Field, kind: type) -> str:
    text = HELP[field.name]
    if "(default:" in text:
        return text
    if kind is bool:
        shown = "on" if field.default else "off"
    elif field.default is None:
        shown = "none"
    else:
        shown = str(field.default)
    return f"{text} (default: {shown})"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key (``batch_size`` -> ``--batch-size``; booleans get ``--no-...``)."""
    parser.epilog = ("The defaults shown are those of a run without --config; a recipe or YAML file replaces them "
                     "and the flags given replace the recipe's values.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        kind = base[0]
        kwargs: dict[str, Any] = {"default": None, "help": _help(f, kind)}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(kind) is list:
            kind = str
        kwargs["type"] = kind
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--nproc-per-node", type=at_least(1), default=None,
                        help="launch torchrun with N processes on this machine (default: one process, no torchrun)")


def run_train(args: argparse.Namespace) -> int:
    """Train in this process, or launch torchrun with the same command when --nproc-per-node is given."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = resolve({k: v for k, v in vars(args).items() if k in fields}, source="command line")
    if args.nproc_per_node is not None:
        check_output(cfg)  # resolve validated every setting; the folder too, here, before any worker starts
        return D.launch_torchrun(args.nproc_per_node, strip_flag(args._argv, "--nproc-per-node"))
    try:
        summary = train(cfg)
    except Interrupted as exc:
        return stopped("train", exc)
    except Diverged as exc:
        print(f"cbam train: error: {exc}", file=sys.stderr, flush=True)
        return 3
    if summary:
        print(f"done: top-1 err {summary['final_top1_err']:.2f}%, top-5 err {summary['final_top5_err']:.2f}% "
              f"(best top-1 {summary['best_top1_err']:.2f}% at epoch {summary['best_epoch']}); "
              f"outputs in {cfg.output}")
    return 0


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value (``--flag V`` or ``--flag=V``)."""
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
    """A saved run, and what to evaluate it on when not its own validation set."""
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder, a checkpoint (.pt) or final weights (model.safetensors) of a run "
                             "(required, no default)")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="data set (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="folder holding the data set (default: the run's)")
    parser.add_argument("--batch-size", type=at_least(1), default=None,
                        help="validation images per batch (default: the run's batch size)")
    parser.add_argument("--workers", type=at_least(0), default=None,
                        help="data-loader worker processes (default: the run's setting)")
    parser.add_argument("--output", default=None,
                        help="JSON file for the results (default: eval_<dataset>.json beside the weights)")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, write the JSON and print one line of results."""
    if args.output:
        check_output_path(args.output, "output", folder=False)
    result = evaluate_run(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                          workers=args.workers)
    out = Path(args.output) if args.output else Path(result["checkpoint"]).parent / f"eval_{result['dataset']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['model']} ({result['attention']}) on {result['dataset']} val, {result['val_images']} images: "
          f"top-1 err {result['top1_err']:.2f}%  top-5 err {result['top5_err']:.2f}%  loss {result['val_loss']:.4f}")
    print(f"written to {out}")
    return 0
