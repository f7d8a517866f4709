"""The training configuration: defaults < recipe YAML (``--config``) < command-line flags.

Recipes ship with the package (``cbam/configs/*.yaml``); ``--config imagenet`` names one, ``--config
my.yaml`` reads a file. Every key of :class:`TrainConfig` can be set in YAML and as a flag
(``batch_size`` <-> ``--batch-size``); unknown keys and wrongly typed values are refused with a one-line
``ValueError`` (the command line prints it as such). Nothing here knows about the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

RECIPES = ("imagenet", "cifar", "demo")

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
    workers: int | None = None
    # optimisation (the paper's ImageNet recipe by default; recipes override)
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    lr_reference_batch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "step"
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    accum_steps: int = 1
    # numerics and speed
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    fuse: bool = True  # cbam.fuse on the CPU (or anywhere with memory_efficient)
    memory_efficient: bool = False  # fused blocks recompute activations in backward
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
        """Refuse values no run can use (ValueError, one line), so a bad config stops before any work."""
        checks = {
            "schedule": ("step", "cosine", "constant"),
            "amp": (None, "bf16", "fp16"),
            "bad_images": ("stop", "skip"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}, got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


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

    ``source`` names the overrides in error messages (the command line passes "command line").
    """
    values: dict[str, Any] = {}
    if overrides.get("config"):
        values.update(load_yaml(overrides["config"]))
    values.update({k: coerce(k, v, source) for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).validate()


def to_yaml(cfg: TrainConfig) -> str:
    """The run's config.yaml: every key, so the file alone rebuilds the run."""
    data = {k: v for k, v in asdict(cfg).items() if k != "config"}
    return yaml.safe_dump(data, sort_keys=False)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A saved run's configuration (keys unknown to this version ignored, missing ones at their defaults)."""
    return TrainConfig(**{k: coerce(k, v, "checkpoint") for k, v in data.items() if k in _FIELDS})
