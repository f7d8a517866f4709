"""Input checks shared by the attention modules: one clear error instead of a silent broadcast."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def check_feature_map(module: str, x: torch.Tensor, channels: int) -> None:
    """Raise if ``x`` is not a floating-point NCHW map with ``channels`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{module}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{module}: expected {channels} channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    if not torch.is_floating_point(x):
        raise TypeError(f"{module}: expected a floating-point input, got dtype {x.dtype}")


def check_positive_int(module: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{module}: {name} must be a positive integer, got {value!r}")
    return value


def check_odd_kernel(module: str, kernel_size: object) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f"{module}: kernel_size must be a positive odd integer (3, 7, ...), got {kernel_size!r}")
    return kernel_size


def check_choice(module: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{module}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value  # type: ignore[return-value]


_GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid}


def make_gate(module: str, gate: str | type[nn.Module] | Callable[[], nn.Module]) -> nn.Module:
    """A gate activation by name ('sigmoid', 'hard_sigmoid') or any nn.Module class / factory."""
    if isinstance(gate, str):
        return _GATES[check_choice(module, "gate", gate, tuple(_GATES))]()
    if callable(gate):
        made = gate()
        if not isinstance(made, nn.Module):
            raise TypeError(f"{module}: gate factory must return an nn.Module, got {type(made).__name__}")
        return made
    raise TypeError(f"{module}: gate must be a name or an nn.Module class, got {type(gate).__name__}")


def make_act(module: str, act_layer: str | type[nn.Module]) -> nn.Module:
    """The MLP's hidden activation: 'relu', 'gelu', 'silu' or an nn.Module class."""
    names = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
    if isinstance(act_layer, str):
        return names[check_choice(module, "act_layer", act_layer, tuple(names))]()
    if isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
        return act_layer()
    raise TypeError(f"{module}: act_layer must be a name or an nn.Module class, got {act_layer!r}")
