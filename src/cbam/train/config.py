"""The training configuration: defaults < recipe YAML (``--config``) < command-line flags.

Recipes ship with the package (``cbam/configs/*.yaml``); ``--config imagenet`` names one, ``--config
my.yaml`` reads a file. Every key of :class:`TrainConfig` can be set in YAML and as a flag
(``batch_size`` <-> ``--batch-size``); unknown keys and wrongly typed values are refused with a one-line
``ValueError`` (the command line prints it as such). Nothing here knows about the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from ..insertion import INITS
from ..layers import ARRANGEMENTS, ATTENTION_TYPES, POOL_TYPES, PRESETS
from ..models import create_model, list_models
from .data import BAD_IMAGE_POLICIES, DATASETS, GENERATED, SHAPE_NAMES

RECIPES = ("imagenet", "cifar", "demo")
SCHEDULES = ("step", "cosine", "constant")

# TrainConfig keys that are ``create_model`` keywords of the same name (passed on only when set, so that the
# model's own defaults apply otherwise); ``profile`` uses the same mapping for its flags.
MODEL_KEYWORDS = ("reduction", "kernel_size", "arrangement", "preset", "pool_types", "spatial_compress", "spatial",
                  "widen", "width_mult", "stride_in_1x1", "in_chans")


def model_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """``create_model`` keywords from a config (or flags) mapping; unset (None) ones are left out."""
    out: dict[str, Any] = {}
    for key in MODEL_KEYWORDS:
        if values.get(key) is not None:
            out[key] = tuple(values[key]) if key == "pool_types" else values[key]
    return out


@dataclass
class TrainConfig:
    # model
    model: str = "cifar_resnet20"
    attention: str = "none"
    reduction: int | None = None
    kernel_size: int | None = None
    arrangement: str | None = None
    preset: str | None = None
    pool_types: list[str] | None = None
    spatial_compress: str | None = None
    spatial: bool | None = None
    widen: float | None = None
    width_mult: float | None = None
    stride_in_1x1: bool | None = None
    in_chans: int | None = None
    attention_init: str = "identity"  # start as the plain network (docs/demo.md); "paper": the modules' own
    # data
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    bad_images: str = "stop"
    synthetic_train_size: int = 5000
    synthetic_val_size: int = 1000
    synthetic_seed: int = 0
    synthetic_classes: int = 10
    clutter: int = 8
    workers: int | None = None
    # optimisation (SGD with a cosine schedule annealed within the run by default; recipes override)
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    lr_reference_batch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "cosine"  # annealed within the run whatever epochs is; the paper's step recipe is in imagenet.yaml
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: float | None = None  # None: 5 % of the run under cosine, none otherwise
    label_smoothing: float = 0.0
    accum_steps: int = 1
    # numerics and speed
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    fuse: bool = True  # cbam.fuse on the CPU (or anywhere with memory_efficient)
    memory_efficient: bool = False  # fused blocks recompute activations in backward
    deterministic: bool = False  # torch.use_deterministic_algorithms and deterministic cuDNN (cbam.train.determinism)
    device: str = "auto"
    # run management
    seed: int = 0
    output: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    save_every_steps: int = 0
    max_steps_per_epoch: int | None = None
    progress: bool = True
    tensorboard: bool = True
    config: str | None = field(default=None, metadata={"cli_only": True})

    def model_kwargs(self) -> dict[str, Any]:
        """The ``create_model`` keywords this configuration sets."""
        return model_kwargs(asdict(self))

    def validate(self) -> TrainConfig:
        """Refuse values no run can use (ValueError, one line naming the setting and its choices or range).

        This is the one validation step of a run: every key, the device, the output folder and the model's
        options (the model is built on the meta device, which costs no memory), so a bad configuration stops
        before any work, and under ``--nproc-per-node`` before any worker starts.
        """
        _check_values(self)
        check_device(self.device)
        check_output_path(self.output, "output")
        _check_model(self)
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _fail(key: str, expected: str, value: Any) -> typing.NoReturn:
    raise ValueError(f"{key} must be {expected}, got {value!r}")


def _choice(key: str, value: Any, choices: tuple[Any, ...], optional: bool = False) -> None:
    if (value is None and optional) or value in choices:
        return
    raise ValueError(f"unknown {key} {value!r}; expected one of {', '.join(map(str, choices))}")


def _check_values(cfg: TrainConfig) -> None:

    # choices
    if cfg.model not in list_models():
        raise ValueError(f"unknown model {cfg.model!r}; expected one of {', '.join(list_models())}")
    attention = cfg.attention.lower() if isinstance(cfg.attention, str) else cfg.attention
    _choice("attention", attention, ("none", *ATTENTION_TYPES))
    _choice("arrangement", cfg.arrangement, ARRANGEMENTS, optional=True)
    _choice("preset", cfg.preset, tuple(PRESETS), optional=True)
    _choice("spatial_compress", cfg.spatial_compress, ("pool", "conv"), optional=True)
    if cfg.pool_types is not None and (not cfg.pool_types or any(p not in POOL_TYPES for p in cfg.pool_types)):
        _fail("pool_types", f"a non-empty subset of {', '.join(POOL_TYPES)}", cfg.pool_types)
    _choice("attention_init", cfg.attention_init, INITS)
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("amp", cfg.amp, ("bf16", "fp16"), optional=True)
    _choice("bad_images", cfg.bad_images, BAD_IMAGE_POLICIES)
    # integers: key -> (minimum, may it be unset)
    minimums = {"reduction": (1, True), "in_chans": (1, True), "workers": (0, True), "epochs": (1, False),
                "batch_size": (1, False), "accum_steps": (1, False), "step_size": (1, False),
                "warmup_epochs": (0, True), "lr_reference_batch": (1, True), "save_every_steps": (0, False),
                "max_steps_per_epoch": (1, True), "synthetic_train_size": (1, False), "clutter": (0, False),
                "synthetic_val_size": (1, False), "seed": (0, False), "synthetic_seed": (0, False),
                "image_size": ({"synthetic": 32, "cluttered-digits": 28}.get(cfg.dataset, 8), True)}
    for key, (low, optional) in minimums.items():
        value = getattr(cfg, key)
        if value is None and optional:
            continue
        if value < low:
            unset = " (or unset)" if optional else ""
            _fail(key, f"at least {low}{unset}", value)
    for key in ("seed", "synthetic_seed"):
        if getattr(cfg, key) >= 2**63:
            _fail(key, "below 2**63", getattr(cfg, key))
    # upper bounds: a value past them is a typo that would exhaust memory or never finish, not a setting
    maximums = {"workers": (max_workers(), f"4 x this machine's {os.cpu_count() or 1} CPUs"),
                "image_size": (4096, "pixels"), "epochs": (100_000, ""), "in_chans": (4096, ""),
                "reduction": (4096, ""), "clutter": (1000, "fragments"),
                "synthetic_train_size": (10_000_000, "images"), "synthetic_val_size": (10_000_000, "images")}
    for key, (high, unit) in maximums.items():
        value = getattr(cfg, key)
        if value is not None and value > high:
            _fail(key, f"at most {high}" + (f" ({unit})" if unit else ""), value)
    if cfg.kernel_size is not None and not (1 <= cfg.kernel_size <= 255 and cfg.kernel_size % 2):
        _fail("kernel_size", "an odd integer from 1 to 255 (3, 7, ...)", cfg.kernel_size)
    if not 2 <= cfg.synthetic_classes <= len(SHAPE_NAMES):
        _fail("synthetic_classes", f"between 2 and {len(SHAPE_NAMES)}", cfg.synthetic_classes)
    if cfg.warmup_epochs is not None and (not math.isfinite(cfg.warmup_epochs) or cfg.warmup_epochs > cfg.epochs):
        _fail("warmup_epochs", f"a number of epochs from 0 to epochs ({cfg.epochs}), or unset", cfg.warmup_epochs)
    if cfg.batch_size % cfg.accum_steps:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of accum_steps {cfg.accum_steps}")
    # real numbers: key -> (lowest, highest, lowest allowed itself)
    ranges = {"lr": (0.0, math.inf, False), "momentum": (0.0, 1.0, True), "weight_decay": (0.0, math.inf, True),
              "gamma": (0.0, math.inf, False), "label_smoothing": (0.0, 1.0, True),
              "widen": (0.0, 16.0, False), "width_mult": (0.0, 16.0, False)}
    for key, (low, high, closed) in ranges.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not closed) or value > high:
            lower = f">= {low:g}" if closed else f"> {low:g}"
            _fail(key, f"a finite number {lower}" + (f" and <= {high:g}" if high < math.inf else ""), value)
    if cfg.nesterov and cfg.momentum <= 0:
        raise ValueError("nesterov needs a momentum above 0, got momentum 0")
    # data, run management
    if cfg.dataset not in GENERATED:
        if not cfg.data_dir:
            raise ValueError(f"dataset {cfg.dataset} needs a data folder (data_dir / --data-dir)")
        data = Path(cfg.data_dir).expanduser()
        if data.exists() and not data.is_dir():
            raise ValueError(f"data_dir {data} is a file, not a folder")
        if not data.exists() and not cfg.download:
            raise ValueError(f"data_dir {data} does not exist (pass download / --download to fetch {cfg.dataset})")
    if not cfg.output:
        raise ValueError("output must name a folder, got an empty string")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume and overwrite contradict each other: pass one of them")


def max_workers() -> int:
    """The most data-loader workers a setting may ask for: 4 per CPU (more is a typo that would fork until OOM)."""
    return 4 * (os.cpu_count() or 1)


def check_loader_settings(cfg: TrainConfig) -> None:
    """The data-loading settings alone (for ``cbam eval``, which takes them without a whole run to validate)."""
    most = max_workers()
    if cfg.workers is not None and not 0 <= cfg.workers <= most:
        _fail("workers", f"from 0 to {most} (4 x this machine's {os.cpu_count() or 1} CPUs)", cfg.workers)
    if cfg.batch_size < 1:
        _fail("batch_size", "at least 1", cfg.batch_size)


def _check_model(cfg: TrainConfig) -> None:
    """Build the model on the meta device: its options are checked by the model itself, at no cost."""
    attention = None if cfg.attention.lower() == "none" else cfg.attention
    kwargs = cfg.model_kwargs()
    with torch.device("meta"):
        create_model(cfg.model, attention=attention, **kwargs)


def available_devices() -> list[str]:
    """The ``device`` settings this machine can run: auto, cpu and one entry per CUDA device."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["auto", "cpu", *(["cuda"] if n else []), *(f"cuda:{i}" for i in range(n))]


def check_device(device: str) -> str:
    """``device`` if this machine has it (auto, cpu, cuda, cuda:N), else a ValueError naming those that exist."""
    devices = available_devices()
    if device not in devices:
        raise ValueError(f"device {device!r} is not available here; devices that exist: {', '.join(devices)}")
    return device


def check_output_path(path: str | Path, what: str = "output", *, folder: bool = True) -> Path:
    """``path`` if it can be written: no part above it is an existing file; a ``folder`` is not a file itself,
    a file is not a folder."""
    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a folder")
    if path.exists() and not folder and path.is_dir():
        raise ValueError(f"{what} {path} is a folder, expected a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
            break
    return path


# ------------------------------------------------------------------------------------------ resuming a run
# What --resume may change. Settings that DEFINE a run (the model and every attention option, the data and its
# options, the optimisation: batch size, lr, momentum, weight decay, schedule and its parameters, seed, amp,
# accumulation steps, steps per epoch) are refused when they differ from the stored run: the checkpoint was made
# with them and would silently keep the old values (or skip other samples). Settings that only say HOW or HOW LONG
# the run goes on may change; the change is applied, logged and written to config.yaml. ``epochs`` may change
# except under the cosine schedule, whose curve is fitted to the number of epochs.
MAY_CHANGE = ("epochs", "workers", "progress", "save_every_steps", "tensorboard", "device", "fuse", "compile",
              "memory_efficient", "deterministic", "channels_last", "data_dir", "download", "bad_images")
NOT_COMPARED = ("output", "resume", "overwrite", "config")
# What a stored run that lacks a key (saved by an older version) was trained with, where that differs from today's
# default: runs before attention_init existed used the modules' own initialisation.
LEGACY_VALUES = {"attention_init": "paper"}
RUN_DEFINING = tuple(k for k in _FIELDS if k not in MAY_CHANGE and k not in NOT_COMPARED)


def resume_changes(stored: Mapping[str, Any], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Compare a stored run's configuration with ``cfg``: (refused differences, allowed ones), one text each.

    Keys the stored configuration lacks (runs from older versions) count as their defaults.
    """
    refused, allowed = [], []
    defaults = TrainConfig()
    for key in _FIELDS:
        if key in NOT_COMPARED:
            continue
        old = stored.get(key, LEGACY_VALUES.get(key, getattr(defaults, key)))
        new = getattr(cfg, key)
        if isinstance(old, (list, tuple)):
            old = list(old)
        if isinstance(new, (list, tuple)):
            new = list(new)
        if old == new:
            continue
        text = f"{key}: stored {old!r}, given {new!r}"
        defining = key in RUN_DEFINING or (key == "epochs" and cfg.schedule == "cosine")
        (refused if defining else allowed).append(text)
    return refused, allowed


def check_resume(stored: Mapping[str, Any], cfg: TrainConfig, where: str) -> list[str]:
    """The allowed changes of resuming ``stored`` with ``cfg`` (to log); a ValueError naming every refused one."""
    refused, allowed = resume_changes(stored, cfg)
    if refused:
        raise ValueError(f"--resume: this command does not fit the run stored in {where}: {'; '.join(refused)} "
                         "(the settings that define a run cannot change on resume: leave them out, or start a new "
                         "--output)")
    return allowed


def stored_config(output: str | Path) -> dict[str, Any] | None:
    """The run configuration saved in ``output``/config.yaml (known keys only), or None when there is none."""
    path = Path(output) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError) as exc:
        raise ValueError(f"{path} is not readable YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping of keys to values, got {type(data).__name__}")
    return {k: coerce(k, v, str(path)) for k, v in data.items() if k in _FIELDS}




def _base_types(hint) -> tuple[type, ...]:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for a in args for t in _base_types(a))
    origin = typing.get_origin(hint)
    return (origin,) if origin else (hint,)


def coerce(key: str, value: Any, source: str) -> Any:
    """Check one config value against the field's type (int accepted for float), with a clear message."""
    if key not in _FIELDS:
        raise ValueError(f"{source}: unknown key {key!r}; expected one of {', '.join(sorted(_FIELDS))}")
    allowed = _base_types(_HINTS[key])
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if list in allowed and isinstance(value, (list, tuple)):
        return list(value)
    if list in allowed and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, bool) and bool not in allowed:
        raise ValueError(f"{source}: {key} expects {_type_names(allowed)}, got {value!r}")
    if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
        raise ValueError(f"{source}: {key} expects {_type_names(allowed)}, got {value!r}")
    return value


def _type_names(allowed) -> str:
    return " or ".join(t.__name__ for t in allowed)


def recipe_path(name: str) -> Path:
    """A shipped recipe by name, or a YAML file by path."""
    if name in RECIPES:
        return Path(str(resources.files("cbam") / "configs" / f"{name}.yaml"))
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"config {name!r} is neither a recipe ({', '.join(RECIPES)}) nor an existing YAML file")
    return path


def load_yaml(name: str) -> dict[str, Any]:
    """A recipe or YAML file's values, each checked against the field's type."""
    path = recipe_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    return {k: coerce(k, v, str(path)) for k, v in data.items()}


def resolve(overrides: Mapping[str, Any], source: str = "overrides") -> TrainConfig:
    """Defaults, then the ``config`` recipe or file named in ``overrides``, then the other overrides (None: unset).

    With ``resume`` the run stored in ``output`` (its config.yaml) comes between the defaults and the recipe, so
    ``--resume --output DIR`` alone continues the run as it was; what is given on top is checked against it
    (:func:`check_resume`) when training starts. ``source`` names the overrides in error messages (the command
    line passes "command line"). The result is validated (:meth:`TrainConfig.validate`).
    """
    values: dict[str, Any] = {}
    if overrides.get("resume") and overrides.get("output"):
        stored = stored_config(overrides["output"])
        if stored:
            values.update({k: v for k, v in stored.items() if k not in NOT_COMPARED})
    if overrides.get("config"):
        values.update(load_yaml(overrides["config"]))
    values.update({k: coerce(k, v, source) for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).validate()


def to_yaml(cfg: TrainConfig) -> str:
    """The run's config.yaml: every key, so the file alone rebuilds the run."""
    data = {k: v for k, v in asdict(cfg).items() if k != "config"}
    return yaml.safe_dump(data, sort_keys=False)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A saved run's configuration (keys unknown to this version ignored, missing ones at what older versions used,
    :data:`LEGACY_VALUES`, else at their defaults)."""
    values = {**LEGACY_VALUES, **{k: v for k, v in data.items() if k in _FIELDS}}
    return TrainConfig(**{k: coerce(k, v, "checkpoint") for k, v in values.items()})
