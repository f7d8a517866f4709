"""``cbam.insert``: CBAM (or SE) added to a network that is already built, and possibly already trained.

Where: every block whose type has a :class:`~cbam.models.blocks.Placement` gets one attention module per site, on
its residual branch after the last normalisation, before the shortcut is added (Woo et al., ECCV 2018, Fig. 3).

Identity initialisation (``init="identity"``, the default) keeps what the network computes, so a pretrained network
keeps its accuracy and fine-tuning learns the attention from there. With the last layer of the channel MLP set to
zero (weight and bias) and the spatial branch's last affine step set to zero (the release's BatchNorm weight and
bias, or the convolution when there is no BatchNorm), both gates are constant: the channel gate is
``sigmoid(0) = 1/2``, the spatial gate ``sigmoid(0) = 1/2``, so ``CBAM(y) = y / 4`` for every input ``y`` (SE:
``y / 2``). The normalisation in front of the slot, ``y = a * x_hat + b``, gets its scale and shift multiplied by 4
(2 for SE), so ``CBAM(4 * y) = y``. Multiplying by a power of two is exact in floating point, so the network's
outputs are bit-for-bit what they were (in eval mode; in train mode too, as batch statistics do not depend on the
affine step). Nothing is frozen: the gates are constant only until the first update, since the zeroed layers still
get gradients (the MLP's last layer sees the hidden activations, the BatchNorm's weight the normalised conv output).
``init="paper"`` instead starts the modules as the paper's networks do (the channel gate random, the spatial gate at
1/2), which changes the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import CBAM, SE, attention_name, get_attn
from ..models.blocks import BlockSpec, Placement, block_spec, registered_blocks

__all__ = ["INITS", "Site", "attention_sites", "block_stages", "identity_gate_", "init_attention", "insert",
           "load_base_weights"]

INITS = ("identity", "paper")


@dataclass
class Site:
    """One attention site found in a network: the block's module path, the block, the placement and its spec."""

    path: str
    block: nn.Module
    placement: Placement
    spec: BlockSpec

    @property
    def slot_path(self) -> str:
        return f"{self.path}.{self.placement.slot}" if self.path else self.placement.slot

    @property
    def occupant(self) -> nn.Module | None:
        module = getattr(self.block, self.placement.slot, None)
        return None if module is None or isinstance(module, nn.Identity) else module


def supported_blocks() -> list[str]:
    """Qualified names of the block types that have a placement, for error messages."""
    names = {f"{t.__module__}.{t.__qualname__}" for t, s in registered_blocks().items() if s.placements and not s.plain}
    return sorted(names)


def attention_sites(model: nn.Module) -> list[Site]:
    """Every registered attention site in ``model``, in module order."""
    sites = []
    for path, module in model.named_modules():
        spec = block_spec(type(module))
        if spec is None:
            continue
        for placement in spec.placements:
            sites.append(Site(path, module, placement, spec))
    return sites


# ----------------------------------------------------------------------------------------------------------------------
# Identity initialisation
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def identity_gate_(module: nn.Module) -> float:
    """Make ``module`` multiply every input by a constant power of two; return that constant (CBAM 1/4, SE 1/2).

    A module of another class can take part by defining ``identity_gate_(self) -> float`` itself."""
    if isinstance(module, CBAM):
        channel = module.channel
        last = _last_gate_layer(module)
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        scale = _gate_at_zero(channel.gate)
        spatial = module.spatial
        if spatial is not None:
            step = spatial.norm if spatial.norm is not None else spatial.conv
            nn.init.zeros_(step.weight)
            if step.bias is not None:
                nn.init.zeros_(step.bias)
            if module.arrangement == "parallel":
                scale = _gate_at_zero(module.gate)
            else:
                scale *= _gate_at_zero(spatial.gate)
        return scale
    if isinstance(module, SE):
        last = _last_gate_layer(module)
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        return _gate_at_zero(module.gate)
    custom = getattr(module, "identity_gate_", None)
    if callable(custom):
        return float(custom())
    raise TypeError(
        f"init='identity' needs an attention module that can start as a constant gate (CBAM, SE, or a class with "
        f"an identity_gate_() method), got {type(module).__name__}; use init='paper'"
    )


def _gate_at_zero(gate: nn.Module) -> float:
    value = float(gate(torch.zeros(1, device="cpu")).item())  # also while building under torch.device("meta")
    if not value > 0:
        raise ValueError(f"init='identity': the gate {type(gate).__name__} is {value} at 0, so it cannot be undone")
    return value


def _check_scalable(target: nn.Module | nn.Parameter | None, where: str) -> None:
    if isinstance(target, torch.Tensor):
        return
    if target is None or not isinstance(getattr(target, "weight", None), torch.Tensor):
        what = "an activation" if target is None else f"{type(target).__name__} without an affine scale"
        raise ValueError(
            f"insert: init='identity' cannot keep {where}'s output: {what} sits in front of the slot, so there is "
            "no linear step to scale; use init='paper' (or stages= to leave that block out)"
        )


@torch.no_grad()
def _scale_(target: nn.Module | nn.Parameter | None, factor: float, where: str) -> None:
    """Multiply the affine scale and shift of ``target`` (or ``target`` itself, a parameter) by ``factor``."""
    _check_scalable(target, where)
    if isinstance(target, torch.Tensor):
        target.mul_(factor)
        return
    target.weight.mul_(factor)
    bias = getattr(target, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.mul_(factor)


def _where(site: Site) -> str:
    return site.path or type(site.block).__name__


def _initialise(site: Site, module: nn.Module, init: str) -> None:
    """Re-initialise a module already in its slot (after the base weights were loaded around it)."""
    if init == "identity":
        scale = identity_gate_(module)
        _scale_(site.placement.norm_of(site.block), 1.0 / scale, _where(site))
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()


def init_attention(model: nn.Module, init: str = "identity") -> list[str]:
    """Initialise every attention module that sits in a registered slot of a freshly built ``model``; return their
    paths.

    ``"identity"`` makes a network built with attention start as exactly the network without it (each gate a
    constant, the norm in front scaled to undo it), so the residual branches start at the plain network's scale
    instead of a quarter of it; training then learns where to attend. ``cbam train`` does this by default
    (``attention_init``; see docs/demo.md for why). ``"paper"`` re-runs each module's own initialisation. Call it once,
    on a network as built: the norms are scaled on every call, so a network that already starts as the identity
    (after ``cbam.insert`` or an earlier call) is refused. Modules outside registered slots (BAM between stages) are
    left as they are. Every site is checked before any weight changes."""
    if init not in INITS:
        raise ValueError(f"init_attention: init must be one of {', '.join(INITS)}, got {init!r}")
    sites = [s for s in attention_sites(model) if s.occupant is not None]
    if init == "identity":
        for site in sites:
            module = site.occupant
            if not isinstance(module, (CBAM, SE)) and not callable(getattr(module, "identity_gate_", None)):
                identity_gate_(module)  # raises its one-line TypeError before anything changed
            if _starts_as_identity(module):
                raise ValueError(f"init_attention: {site.slot_path} already starts as the identity (its gate's last "
                                 "layer is zero); call it once, on a freshly built network")
            _check_scalable(site.placement.norm_of(site.block), _where(site))
    for site in sites:
        _initialise(site, site.occupant, init)
    return [site.slot_path for site in sites]


def _last_gate_layer(module: nn.Module) -> nn.Module | None:
    """The channel gate's output layer of a CBAM or SE (what identity initialisation zeroes); None for others."""
    if isinstance(module, CBAM):
        return module.channel.fc2 if module.channel.fc2 is not None else module.channel.fc1
    if isinstance(module, SE):
        return module.fc2
    return None


def _starts_as_identity(module: nn.Module) -> bool:
    weight = getattr(_last_gate_layer(module), "weight", None)
    return isinstance(weight, torch.Tensor) and weight.device.type != "meta" and not bool(weight.any())


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------
def block_stages(model: nn.Module) -> dict[str, int]:
    """Block path -> stage number (from 1) of every block :func:`insert` knows in ``model``, as ``stages=`` counts.

    Where the blocks sit in two or more containers, a stage is a container, in order (a ResNet's ``layer1`` to
    ``layer4``, also when dilation keeps the later ones at one resolution; EfficientNet's ``features.1`` to
    ``features.7``; RegNet's ``block1`` to ``block4``; ConvNeXt's four stages). Where they all sit in one container
    (MobileNetV2 and V3), a stage is a resolution: the blocks' output strides, ranked, found by one forward pass of a
    128 x 128 zero image in eval mode without gradients."""
    return _stage_numbers(model, attention_sites(model))


def _parent(path: str) -> str | None:
    return path.rsplit(".", 1)[0] if "." in path else ("" if path else None)


def _stage_numbers(model: nn.Module, sites: list[Site], probe_size: int = 128) -> dict[str, int]:
    """Block path -> stage, 1-based (see :func:`block_stages`)."""
    parents = list(dict.fromkeys(_parent(s.path) for s in sites if s.path))
    if len(parents) > 1:
        order = {parent: i + 1 for i, parent in enumerate(parents)}
        return {s.path: order.get(_parent(s.path), 1) for s in sites}
    return _stages_by_resolution(model, sites, probe_size)


def _stages_by_resolution(model: nn.Module, sites: list[Site], probe_size: int) -> dict[str, int]:
    """Block path -> the rank of the block's output stride among all the blocks' (1 = the finest)."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError(f"insert: stages= needs a convolutional network, {type(model).__name__} has no Conv2d")
    strides: dict[str, float] = {}
    handles = []
    for site in sites:
        if site.path in strides or not site.path:  # the network itself (MobileNetV1's stem): stage 1, below
            continue
        strides[site.path] = 0.0

        def record(_module, _inputs, output, path=site.path):
            strides[path] = probe_size / output.shape[-1]

        handles.append(site.block.register_forward_hook(record))
    param = next(model.parameters())
    probe = torch.zeros(1, first_conv.in_channels, probe_size, probe_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    except Exception as exc:  # noqa: BLE001 - a network that does not take an image batch: say so in one line
        raise ValueError(
            f"insert: stages= numbers stages by running {type(model).__name__} on a {probe_size}x{probe_size} "
            f"image batch, which failed ({type(exc).__name__}: {exc}); insert into its backbone instead"
        ) from None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    ranks = {s: i + 1 for i, s in enumerate(sorted(set(strides.values())))}
    root = {"": 1} if any(not site.path for site in sites) else {}
    return {**root, **{path: ranks[stride] for path, stride in strides.items()}}


def _stage_filter(stages: Sequence[int] | Sequence[bool]) -> list[int]:
    if isinstance(stages, (str, bytes)) or not isinstance(stages, (Sequence, range)):
        raise TypeError(f"insert: stages must be a sequence of stage numbers or of True/False, got {stages!r}")
    values = list(stages)
    if values and all(isinstance(v, bool) for v in values):  # MMDetection's per-stage switches
        chosen = [i + 1 for i, v in enumerate(values) if v]
        if not chosen:
            raise ValueError(f"insert: stages={tuple(values)} selects no stage")
        return chosen
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"insert: stages must be stage numbers from 1 (or one True/False per stage), got {stages!r}")
    return values


# ----------------------------------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------------------------------
def insert(
    model: nn.Module,
    attention: str | type[nn.Module] = "cbam",
    *,
    init: str = "identity",
    stages: Sequence[int] | Sequence[bool] | None = None,
    **module_kwargs: Any,
) -> list[str]:
    """Put ``attention`` ("cbam", "se" or a class taking ``(channels, **module_kwargs)``) into every supported block
    of ``model``, in place, where the paper puts it; returns the module paths of the new modules.

    ``init="identity"`` keeps the network's outputs exactly (see the module docstring for the formula);
    ``init="paper"`` starts the modules as the paper does. ``stages`` keeps only the blocks of those stages (1-based,
    numbered by output resolution: a ResNet's ``layer1`` to ``layer4`` are 1 to 4), or takes one True/False per
    stage as MMDetection's plugin configs do. ``module_kwargs`` configure every module (``reduction=8``,
    ``preset="timm"``, ...). Nothing changes when it raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"insert: expected an nn.Module, got {type(model).__name__}")
    if init not in INITS:
        raise ValueError(f"insert: init must be one of {', '.join(INITS)}, got {init!r}")
    cls = get_attn(attention)
    name = attention_name(attention)
    if cls is None or name == "bam":
        raise ValueError(
            f"insert: attention must be 'cbam', 'se' or a module class, got {attention!r} "
            "(BAM sits between stages, not in blocks: build it with cbam.create_model)"
        )
    sites = attention_sites(model)
    if not sites:
        raise ValueError(
            f"insert: {type(model).__name__} has no block type insert knows; supported: {', '.join(supported_blocks())}"
            "; register yours with cbam.register_placement"
        )
    taken = [s for s in sites if s.occupant is not None]
    if taken:
        first = taken[0]
        raise ValueError(
            f"insert: {first.slot_path} already holds {type(first.occupant).__name__} ({len(taken)} of {len(sites)} "
            "sites have attention); insert into a network once"
        )
    if stages is not None:
        wanted = _stage_filter(stages)
        numbers = _stage_numbers(model, sites)
        found = sorted(set(numbers.values()))
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise ValueError(f"insert: no stage {missing[0]}; {type(model).__name__} has stages {found}")
        sites = [s for s in sites if numbers[s.path] in wanted]
    built = []
    for site in sites:  # build and initialise everything first, so an error leaves the network as it was
        channels = site.placement.channels_of(site.block)
        module = cls(channels, **module_kwargs)
        reference = next(site.block.parameters(), None)
        if reference is not None:
            module = module.to(device=reference.device, dtype=reference.dtype)
        scale = None  # init="paper": a new module already starts as its class (and preset) initialises it
        if init == "identity":
            scale = identity_gate_(module)  # only the new module changes; raises for modules that cannot
            _check_scalable(site.placement.norm_of(site.block), _where(site))
        built.append((module, scale))
    paths = []
    for site, (module, scale) in zip(sites, built, strict=True):
        if scale is not None:
            _scale_(site.placement.norm_of(site.block), 1.0 / scale, _where(site))
        module.train(site.block.training)
        setattr(site.block, site.placement.slot, module)
        if site.spec.attended is not None and type(site.block) is site.spec.block_type:
            site.block.__class__ = site.spec.attended
        paths.append(site.slot_path)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# The original weights into the modified network
# ----------------------------------------------------------------------------------------------------------------------
def load_base_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, init: str = "identity"
) -> list[str]:
    """Load the weights of the network without attention (torchvision's, timm's, your own) into ``model`` after
    :func:`insert` (or into a package network built with attention); returns the keys it did not find, exactly the
    attention modules' keys (as ``load_state_dict(strict=False)`` reports them). The attention modules are then
    initialised as ``init`` says, so with ``"identity"`` the model computes what the original network computes.
    Anything else missing, any unexpected key or a shape that does not fit raises a ValueError naming the first ones,
    before anything is loaded."""
    if init not in INITS:
        raise ValueError(f"load_base_weights: init must be one of {', '.join(INITS)}, got {init!r}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_base_weights: expected a state dict (a mapping of names to tensors), got {state_dict!r}")
    sites = [s for s in attention_sites(model) if s.occupant is not None]
    attention_keys = {
        f"{s.slot_path}.{k}" for s in sites for k in s.occupant.state_dict()
    }
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        key = not_tensors[0]
        raise TypeError(f"load_base_weights: expected tensors, {key} is {type(state_dict[key]).__name__}")
    given_attention = sorted(k for k in state_dict if k in attention_keys)
    if given_attention:
        raise ValueError(
            f"load_base_weights: the weights already hold attention weights ({given_attention[0]}, ...), so they are "
            "not the network without attention; load them with model.load_state_dict"
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    # a BatchNorm fills in a missing ``num_batches_tracked`` itself (older checkpoints lack it), as load_state_dict does
    other_missing = [k for k in missing if k not in attention_keys and not k.endswith(".num_batches_tracked")]
    if other_missing or unexpected:
        parts = []
        if other_missing:
            parts.append(f"missing {', '.join(other_missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        raise ValueError(f"load_base_weights: the weights do not fit {type(model).__name__}: {'; '.join(parts)}")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if tuple(v.shape) != own[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise ValueError(f"load_base_weights: {key} has shape {list(got)}, the model expects {list(want)}")
    result = model.load_state_dict(dict(state_dict), strict=False)
    for site in sites:
        _initialise(site, site.occupant, init)
    return sorted(result.missing_keys)
