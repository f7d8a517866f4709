"""``cbam.record``: what every CBAM module of a network attends to, captured during a forward pass.

A forward hook on each CBAM module sees the module's input and recomputes its two gates from it with the module's
own gates (the reference formulas, without gradient): the channel gate ``sigmoid(Mc(x))`` as N x C and the spatial
gate ``sigmoid(Ms(x'))`` as N x 1 x H x W, where ``x'`` is the map the spatial gate sees (the channel-refined map for
the paper's channel-first order). Nothing of the model changes: on leaving the ``with`` block every hook is removed.
The hooks sit on the CBAM modules themselves, so the CPU kernels keep serving the modules' own forward, and a block
fused by :func:`cbam.fuse` runs its plain forward while they observe it (its fused forward would not call the module).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import CBAM

__all__ = ["Recording", "record"]


@dataclass
class Recording:
    """The gates of the last forward pass by module path: ``channel[path]`` (N x C), ``spatial[path]``
    (N x 1 x H x W; absent for a channel-only module); ``paths`` lists every CBAM module in module order."""

    paths: list[str]
    channel: dict[str, torch.Tensor] = field(default_factory=dict)
    spatial: dict[str, torch.Tensor] = field(default_factory=dict)


def _gates(module: CBAM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    channel = module.channel.gate(module.channel.logits(x))
    if module.spatial is None:
        return channel, None
    if module.arrangement == "channel_first":
        seen = x * channel
    elif module.arrangement == "spatial_first":
        seen = x
        channel = module.channel.gate(module.channel.logits(x * module.spatial.gate(module.spatial.logits(x))))
    else:  # parallel: both gates from the same input (the module applies one sigmoid of the summed logits)
        seen = x
    return channel, module.spatial.gate(module.spatial.logits(seen))


@contextmanager
def record(model: nn.Module) -> Iterator[Recording]:
    """``with cbam.record(model) as rec: model(x)`` fills ``rec.channel`` and ``rec.spatial`` by module path.

    A ValueError when ``model`` holds no CBAM module. Works on networks from :func:`cbam.create_model`, after
    :func:`cbam.insert` and after :func:`cbam.fuse`; the model's outputs are those it computes without recording."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"record: expected an nn.Module, got {type(model).__name__}")
    modules = [(path, m) for path, m in model.named_modules() if isinstance(m, CBAM)]
    if not modules:
        raise ValueError(f"record: {type(model).__name__} has no CBAM module to record")
    rec = Recording(paths=[path for path, _ in modules])

    def hook_for(path: str):
        def hook(module: CBAM, args: tuple, _output: torch.Tensor) -> None:
            with torch.no_grad():
                channel, spatial = _gates(module, args[0].detach())
            rec.channel[path] = channel.flatten(1).float().cpu()
            if spatial is not None:
                rec.spatial[path] = spatial.float().cpu()

        return hook

    handles = [m.register_forward_hook(hook_for(path)) for path, m in modules]
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()
