"""Detect, convert, check and load: the checkpoint formats of :mod:`cbam.convert` into this package's ResNets.

Three steps, each usable on its own: :func:`convert_state_dict` (a state dict in, the target model's state dict out),
:func:`infer_model` (which registered network and attention options a converted state dict needs) and
:func:`convert_checkpoint` (a file in, a checked ``.safetensors`` out; what ``cbam convert`` runs).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from torch import nn

from ..insertion import attention_sites, load_base_weights
from ..layers import CBAM
from ..models import create_model, is_model
from ..models._registry import model_kwarg_names
from ..train.checkpoint import save_weights
from ..train.config import model_kwargs
from .files import Checkpoint, read_checkpoint, state_dict_of
from .layouts import LAYOUT_NAMES, detect_layout, to_cbam_layout

try:
    from timm.models import resnet as timm_resnet
except ImportError:  # timm is optional: without it a timm checkpoint converts, unchecked against timm's network
    timm_resnet = None

__all__ = [
    "CHECK_RTOL",
    "ModelSpec",
    "convert_checkpoint",
    "convert_state_dict",
    "fit_state_dict",
    "infer_model",
    "load_into",
    "resnet_structure",
]

CHECK_RTOL = 1e-4  # converted logits vs the source network's, relative to the largest logit
_MLP_BIAS = re.compile(r"\.channel\.fc[12]\.bias$")
# (bottleneck, blocks per stage) -> registered name; a 3 x 3 stem adds "_cifar" (the release's CIFAR form)
_RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


def _model_label(model: nn.Module) -> str:
    name = getattr(model, "model_name", type(model).__name__)
    return f"{name} (attention {getattr(model, 'attention', 'unknown')})"


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ----------------------------------------------------------------------------------------------------------------------
# state dict -> state dict
# ----------------------------------------------------------------------------------------------------------------------
def fit_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, layout: str = "cbam"
) -> dict[str, torch.Tensor]:
    """``state`` (already in this package's keys) completed to exactly ``model``'s keys and checked against its shapes.

    Completed: a BatchNorm's ``num_batches_tracked`` that older files lack (0; the package's BatchNorms use a fixed
    momentum, so it is never read), MLP biases a bias-free source lacks (0: exactly "no bias"); an MLP bias the model
    does not have is dropped if it is zero. Without any attention key (a plain ResNet) into a model with attention,
    the attention modules start as the identity (:func:`cbam.load_base_weights`, ``init="identity"``): the model's
    logits are the plain network's. Anything else that does not fit is a ValueError naming the first keys and shapes.
    """
    expected = model.state_dict()
    ours = dict(state)
    for key, value in expected.items():
        stem = key.removesuffix("num_batches_tracked")
        if stem != key and key not in ours and stem + "running_mean" in ours:
            ours[key] = torch.zeros_like(value, device="cpu")
        if _MLP_BIAS.search(key) and key not in ours and key.removesuffix("bias") + "weight" in ours:
            ours[key] = torch.zeros(value.shape, dtype=ours[key.removesuffix("bias") + "weight"].dtype)
    for key in [k for k in ours if _MLP_BIAS.search(k) and k not in expected]:
        if key.removesuffix("bias") + "weight" in expected:
            if torch.count_nonzero(ours[key]):
                raise ValueError(f"{key} is not zero but {_model_label(model)} has no MLP biases; build it with "
                                 "mlp_bias=True (the default preset 'paper')")
            del ours[key]
    sites = [s for s in attention_sites(model) if s.occupant is not None]
    attention_keys = {f"{s.slot_path}.{k}" for s in sites for k in s.occupant.state_dict()}
    plain = bool(attention_keys) and not attention_keys & ours.keys()
    wanted = set(expected) - (attention_keys if plain else set())
    missing = sorted(wanted - ours.keys())
    unexpected = sorted(ours.keys() - set(expected))
    shapes = [f"{k} {list(v.shape)} in the checkpoint, {list(expected[k].shape)} in the model"
              for k, v in ours.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {_first(missing)}"] if missing else []
        parts += [f"unexpected {_first(unexpected)}"] if unexpected else []
        parts += [f"shape of {_first(shapes, 2)}"] if shapes else []
        hint = ""
        if any(".attn." in k for k in unexpected) and not attention_keys:
            hint = "; the checkpoint has attention modules: build the model with attention='cbam'"
        raise ValueError(f"the weights ({LAYOUT_NAMES.get(layout, layout)} layout) do not fit "
                         f"{_model_label(model)}: {'; '.join(parts)}{hint}")
    if plain:  # identity attention on the plain network's weights, computed on a copy: the model stays untouched
        twin = copy.deepcopy(model)
        load_base_weights(twin, ours, init="identity")
        return {k: v.detach() for k, v in twin.state_dict().items()}
    return {k: ours[k] for k in expected}


def convert_state_dict(state: Mapping[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict for model, layout)``: ``state`` (a state dict, or a checkpoint dict around one under
    ``state_dict`` or ``model``, keys with or without ``module.``) detected as one of
    :data:`cbam.convert.FORMATS`, renamed, completed and checked against ``model`` (see :func:`fit_state_dict`);
    ``model.load_state_dict(result, strict=True)`` then loads it. ``model`` itself is not changed."""
    flat = state_dict_of(state)
    layout = detect_layout(flat)
    if layout is None:
        raise ValueError(f"not a checkpoint layout this package knows ({', '.join(LAYOUT_NAMES.values())}); "
                         f"first keys: {_first(sorted(flat))}")
    return fit_state_dict(to_cbam_layout(flat, layout), model, layout), layout


def _format_name(ckpt: Checkpoint, layout: str) -> str:
    return "cbam" if ckpt.ours and layout in ("cbam", "torchvision") else layout


def load_into(model: nn.Module, path: str | Path) -> str:
    """Load the checkpoint at ``path`` (any of :data:`cbam.convert.FORMATS`) into ``model`` strictly, after
    conversion and a check of every key and shape; returns the detected format's name."""
    ckpt = read_checkpoint(path)
    try:
        state, layout = convert_state_dict(ckpt.state, model)
        _check_recorded_options(ckpt.metadata, model)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from None
    model.load_state_dict(state, strict=True)
    return _format_name(ckpt, layout)


# CBAM options that do not show in the tensors: a file that records them must meet a model built with them
_UNSEEN_OPTIONS = {
    "pool_types": lambda m: tuple(m.channel.pool_types),
    "arrangement": lambda m: m.arrangement,
    "spatial_compress": lambda m: None if m.spatial is None else m.spatial.compress_mode,
}


def _check_recorded_options(metadata: Mapping[str, str], model: nn.Module) -> None:
    """Refuse a model built with other unseen CBAM options than those the file records (``cbam convert`` writes
    them): the weights would load and compute another function."""
    if "module_kwargs" not in metadata:
        return
    recorded = _json(metadata, "module_kwargs")
    module = next((m for m in model.modules() if isinstance(m, CBAM)), None)
    if module is None:
        return
    for key, read in _UNSEEN_OPTIONS.items():
        if key not in recorded:
            continue
        want, have = recorded[key], read(module)  # _json already made pool_types a tuple
        if have != want:
            raise ValueError(f"the weights were made for {key}={want!r}, the model has {key}={have!r}; build it "
                             f"with {key}={want!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Which network a state dict is
# ----------------------------------------------------------------------------------------------------------------------
def resnet_structure(state: Mapping[str, torch.Tensor]) -> tuple[bool, tuple[int, ...], bool]:
    """``(bottleneck, blocks per stage, CIFAR stem)`` of a ResNet state dict in torchvision's keys; a ValueError when
    it is not a ResNet of plain width (64 channels in ``layer1``, no groups)."""
    if "conv1.weight" not in state or "fc.weight" not in state:
        raise ValueError(f"not a ResNet: no conv1.weight / fc.weight among {_first(sorted(state))}")
    stages = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not blocks or blocks != set(range(len(blocks))):
            raise ValueError(f"not a ResNet: the blocks of layer{stage} are {sorted(blocks)}")
        stages.append(len(blocks))
    bottleneck = "layer1.0.conv3.weight" in state
    conv1, conv2 = state["layer1.0.conv1.weight"], state["layer1.0.conv2.weight"]
    if conv1.shape[0] != 64 or conv2.shape[1] != 64:
        raise ValueError(f"layer1.0 has {conv1.shape[0]} channels in groups of {conv2.shape[1]}: a wide or grouped "
                         "ResNet; name the model (--model)")
    return bottleneck, tuple(stages), state["conv1.weight"].shape[-1] == 3


@dataclass
class ModelSpec:
    """A registered network and its options: enough to build the model a converted state dict loads into."""

    name: str
    attention: str = "none"
    num_classes: int = 1000
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    module_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        attention = None if self.attention == "none" else self.attention
        return create_model(self.name, attention=attention, num_classes=self.num_classes, **self.model_kwargs,
                            **self.module_kwargs)


def _attention_of(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(".attn.channel." in k for k in keys):
        return "cbam"
    if any(".attn.fc1." in k for k in keys):
        return "se"
    if any(k.startswith("bam1.") for k in keys):
        return "bam"
    return "none"


def _reduction(state: Mapping[str, torch.Tensor], suffix: str) -> int | None:
    """The reduction r with hidden = C // r in every module (None: the default 16); a ValueError if none fits."""
    widths = [tuple(v.shape) for k, v in sorted(state.items()) if k.endswith(suffix) and v.dim() == 2]
    hidden, channels = widths[0]
    r = max(1, channels // hidden)
    if not all(c // r == h for h, c in widths):
        raise ValueError(f"the MLP widths {sorted(set(widths))[:3]} fit no single reduction ratio; pass reduction")
    return None if r == 16 else r


def _cbam_kwargs(state: Mapping[str, torch.Tensor], own: bool) -> dict[str, Any]:
    """CBAM options that show in the tensors: one channel layer (Ultralytics' form), the reduction, MLP biases (only
    for this package's files: a bias-free foreign MLP converts exactly into biases of zero), the spatial gate's
    presence, kernel, compression, norm and bias. Pool types and the arrangement do not show."""
    prefix = min(m.group(1) for k in state if (m := re.match(r"^(.*\.attn\.)channel\.fc1\.weight$", k)))
    kw: dict[str, Any] = {}
    single = prefix + "channel.fc2.weight" not in state
    if single:
        kw["preset"] = "ultralytics"
    elif (r := _reduction(state, ".attn.channel.fc1.weight")) is not None:
        kw["reduction"] = r
    if own and not single and prefix + "channel.fc1.bias" not in state:
        kw["mlp_bias"] = False
    conv = state.get(prefix + "spatial.conv.weight")
    if conv is None:
        kw["spatial"] = False
        return kw
    if conv.shape[-1] != 7:
        kw["kernel_size"] = int(conv.shape[-1])
    if prefix + "spatial.compress.weight" in state:
        kw["spatial_compress"] = "conv"
    norm = prefix + "spatial.norm.weight" in state
    if norm == single:  # the paper's preset has the norm, Ultralytics' has none
        kw["spatial_norm"] = norm
    if prefix + "spatial.conv.bias" in state:
        kw["spatial_bias"] = True
    return kw


def _json(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata.get(key) or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"the file's metadata {key!r} is not JSON: {metadata[key][:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the file's metadata {key!r} is not a JSON object")
    if isinstance(value.get("pool_types"), list):
        value["pool_types"] = tuple(value["pool_types"])
    return value


def infer_model(
    state: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None, arch: str | None = None,
    own: bool = False,
) -> ModelSpec:
    """The network a state dict in this package's keys belongs to. The file's own record wins where it has one
    (``metadata`` written by this package: ``model``, ``attention``, ``model_kwargs``, ``module_kwargs``); otherwise
    the name comes from the block type and the blocks per stage (ResNet-18/34/50/101/152, ``_cifar`` with a 3 x 3
    stem), or from ``arch`` (the release's record) when that is a registered name; the classes, input channels and
    the attention options that show in the tensors come from the shapes. ``own``: a file of this package."""
    metadata = dict(metadata or {})
    name = metadata.get("model")
    if not name:
        try:
            bottleneck, stages, cifar = resnet_structure(state)
            name = _RESNETS.get((bottleneck, stages))
            if name is not None and cifar:
                name = f"{name}_cifar" if is_model(f"{name}_cifar") else None
        except ValueError:
            if not (arch and is_model(arch)):
                raise
            name = arch
        if name is None:
            block = "bottleneck" if bottleneck else "basic"
            raise ValueError(f"no registered ResNet has {block} blocks {list(stages)}; name the model (--model)")
    spec = ModelSpec(name, metadata.get("attention") or _attention_of(state))
    if "fc.weight" in state:
        spec.num_classes = int(state["fc.weight"].shape[0])
    spec.model_kwargs = _json(metadata, "model_kwargs")
    if "conv1.weight" in state and state["conv1.weight"].shape[1] != 3:
        spec.model_kwargs.setdefault("in_chans", int(state["conv1.weight"].shape[1]))
    if "module_kwargs" in metadata:
        spec.module_kwargs = _json(metadata, "module_kwargs")
    elif spec.attention == "cbam" and _attention_of(state) == "cbam":
        spec.module_kwargs = _cbam_kwargs(state, own)
    elif spec.attention == "se" and _attention_of(state) == "se":
        r = _reduction(state, ".attn.fc1.weight")
        spec.module_kwargs = {} if r is None else {"reduction": r}
    return spec


def _run_record(ckpt: Checkpoint) -> dict[str, str]:
    """For a training run's file: its model and options as recorded by the run (the ``config`` in a ``.pt``
    checkpoint, ``config.yaml`` beside ``model.safetensors``), in the metadata form :func:`infer_model` reads; the
    file's own metadata (model and attention only) where there is no such record."""
    config: Any = None
    if ckpt.container == "cbam-pt":
        config = ckpt.state.get("config")
    elif (ckpt.path.parent / "config.yaml").is_file():
        try:
            config = yaml.safe_load((ckpt.path.parent / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            config = None
    name = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(name, str) or not is_model(name) or ckpt.metadata.get("model", name) != name:
        return dict(ckpt.metadata)
    options = model_kwargs(config)
    network = model_kwarg_names(name)
    return {
        "model": name,
        "attention": str(config.get("attention") or "none"),
        "model_kwargs": json.dumps({k: v for k, v in options.items() if k in network}),
        "module_kwargs": json.dumps({k: v for k, v in options.items() if k not in network}),
    }


# ----------------------------------------------------------------------------------------------------------------------
# File to file, checked
# ----------------------------------------------------------------------------------------------------------------------
def _probe(model: nn.Module) -> torch.Tensor:
    conv1 = model.conv1
    size = 32 if conv1.kernel_size[0] == 3 else 64
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, conv1.in_channels, size, size, generator=gen)


def _reference(flat: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], layout: str,
               spec: ModelSpec) -> tuple[nn.Module | None, str]:
    """The source's own network with the source's weights, where this package can build it, and what it is."""
    try:
        bottleneck, stages, cifar = resnet_structure(ours)
    except ValueError:
        bottleneck, stages, cifar = False, (), True
    if layout == "torchvision" and not spec.model_kwargs and _RESNETS.get((bottleneck, stages)) == spec.name:
        net = getattr(torchvision.models, spec.name)(num_classes=spec.num_classes)
        net.load_state_dict(fit_state_dict(ours, net, layout), strict=True)
        return net, "torchvision's network"
    if layout == "timm" and timm_resnet is not None and stages and not cifar:
        block = timm_resnet.Bottleneck if bottleneck else timm_resnet.BasicBlock
        in_chans = int(ours["conv1.weight"].shape[1])
        net = timm_resnet.ResNet(block, list(stages), num_classes=spec.num_classes, in_chans=in_chans,
                                 block_args={"attn_layer": "cbam"})
        try:
            net.load_state_dict(flat, strict=True)
        except RuntimeError:
            return None, "not checked: timm's default CBAM ResNet does not take the file as it is"
        return net, "timm's network"
    if layout in ("torchvision", "cbam") and _attention_of(ours) == "none" and spec.attention != "none":
        plain = ModelSpec(spec.name, "none", spec.num_classes, dict(spec.model_kwargs)).build()
        plain.load_state_dict(fit_state_dict(ours, plain, layout), strict=True)
        return plain, "the plain network"
    if layout == "release":
        return None, "not checked against the source network (the release's code is not part of this package)"
    return None, "no conversion: the tensors are loaded as they are"


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    attention: str | None = None,
    **module_kwargs: Any,
) -> dict[str, Any]:
    """Convert the checkpoint ``source`` (any of :data:`cbam.convert.FORMATS`) into ``out`` (``.safetensors``) for
    this package's network, inferred (:func:`infer_model`) unless ``model`` / ``attention`` / ``module_kwargs`` say.

    Where this package can build the source's network (torchvision's ResNet, timm's CBAM ResNet, the plain network a
    plain checkpoint gets identity attention on), the converted model's logits are compared with it on two random
    images; a relative difference above :data:`CHECK_RTOL` is a ValueError. ``out`` is written atomically with its
    digest and the metadata :func:`load_into` and ``cbam convert`` read back; on any error nothing is written (an
    existing ``out`` stays as it was). Returns what was done, for the one-line summary."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"the output {out} is a folder; expected a .safetensors file path")
    ckpt = read_checkpoint(source)
    flat = state_dict_of(ckpt.state)
    layout = detect_layout(flat)
    if layout is None:
        raise ValueError(f"checkpoint {source}: not a checkpoint layout this package knows "
                         f"({', '.join(LAYOUT_NAMES.values())}); first keys: {_first(sorted(flat))}")
    ours = to_cbam_layout(flat, layout)
    fmt = _format_name(ckpt, layout)
    own_meta = (ckpt.metadata if "module_kwargs" in ckpt.metadata else _run_record(ckpt)) if fmt == "cbam" else None
    arch = ckpt.state.get("arch") if isinstance(ckpt.state.get("arch"), str) else None
    spec = infer_model(ours, metadata=own_meta, arch=arch, own=fmt == "cbam")
    if model is not None:
        spec.name = model
    if attention is not None and attention != spec.attention:
        spec.attention = attention
        if attention != _attention_of(ours):
            spec.module_kwargs = {}
    spec.module_kwargs.update({k: v for k, v in module_kwargs.items() if v is not None})
    net = spec.build()
    try:
        net.load_state_dict(fit_state_dict(ours, net, layout), strict=True)
    except ValueError as exc:
        raise ValueError(f"checkpoint {source}: {exc}") from None
    net.eval()
    reference, what = _reference(flat, ours, layout, spec)
    check = what
    if reference is not None:
        reference.eval()
        x = _probe(net)
        with torch.no_grad():
            want, got = reference(x), net(x)
        diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if not diff <= CHECK_RTOL:
            raise ValueError(f"the converted model's logits differ from {what}'s by {diff:.2e} (relative), above "
                             f"{CHECK_RTOL:g}; nothing written")
        check = f"logits match {what} (max relative difference {diff:.1e} on 2 random images)"
    metadata = {
        "format": "cbam",
        "model": spec.name,
        "attention": spec.attention,
        "num_classes": str(spec.num_classes),
        "model_kwargs": json.dumps(spec.model_kwargs, sort_keys=True),
        "module_kwargs": json.dumps(spec.module_kwargs, sort_keys=True),
        "source_format": fmt,
        "source_file": Path(source).name,
        "source_sha256": ckpt.sha256,
    }
    save_weights(out, net, metadata)
    return {
        "source": str(source), "out": str(out), "format": fmt, "model": spec.name, "attention": spec.attention,
        "num_classes": spec.num_classes, "model_kwargs": spec.model_kwargs, "module_kwargs": spec.module_kwargs,
        "tensors": len(net.state_dict()), "params": sum(p.numel() for p in net.parameters()), "check": check,
    }
