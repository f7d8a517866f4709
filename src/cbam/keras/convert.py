"""Weights between the Keras layers and the PyTorch module, in the module's documented state-dict contract.

The keys and shapes are those of ``cbam.CBAM.state_dict()`` (docs/module.md): ``channel.fc1.weight`` [C/r, C],
``channel.fc1.bias``, ``channel.fc2.weight`` [C, C/r], ``channel.fc2.bias``, ``spatial.compress.weight`` [1, C, 1, 1],
``spatial.conv.weight`` [1, 2, k, k] (input 0 = channel average, 1 = channel max), ``spatial.conv.bias`` [1],
``spatial.norm.{weight, bias, running_mean, running_var, num_batches_tracked}``. Keras keeps dense kernels as
[in, out] (PyTorch's weight transposed) and conv kernels as HWIO (PyTorch's OIHW with axes (2, 3, 1, 0)); both data
formats share the same kernels, so one state dict serves NHWC and NCHW layers alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layers.cbam import CBAM as TorchCBAM
from ..layers.cbam import ChannelGate as TorchChannelGate
from ..layers.cbam import SpatialGate as TorchSpatialGate
from ._require import keras
from .layers import CBAM, ChannelGate, SpatialGate

__all__ = ["from_torch", "to_torch"]

# layout name -> (PyTorch array -> Keras array, Keras array -> PyTorch array)
_LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "dense": (lambda a: a.T, lambda a: a.T),  # Linear weight [out, in] <-> kernel [in, out]
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "same": (lambda a: a, lambda a: a),
}
_TORCH_TYPES = {CBAM: TorchCBAM, ChannelGate: TorchChannelGate, SpatialGate: TorchSpatialGate}


# per gate layer: (state-dict key, Keras weight attribute, layout), in the PyTorch module's order
_KEYS: dict[type, tuple[tuple[str, str, str], ...]] = {
    ChannelGate: (("fc1.weight", "fc1_kernel", "dense"), ("fc1.bias", "fc1_bias", "same"),
                  ("fc2.weight", "fc2_kernel", "dense"), ("fc2.bias", "fc2_bias", "same")),
    SpatialGate: (("compress.weight", "compress_kernel", "conv"), ("conv.weight", "conv_kernel", "conv"),
                  ("conv.bias", "conv_bias", "same"), ("norm.weight", "gamma", "same"), ("norm.bias", "beta", "same"),
                  ("norm.running_mean", "moving_mean", "same"), ("norm.running_var", "moving_variance", "same"),
                  ("norm.num_batches_tracked", "num_batches_tracked", "same")),
}


def _entries(layer: Any, channels: int, prefix: str = "") -> list[tuple[str, Any, str, str, tuple[int, ...]]]:
    """(state-dict key, Keras layer, its weight attribute, layout, PyTorch shape) for every tensor the PyTorch twin of
    ``layer`` stores, in its order, for ``channels`` input channels: known without building the layer."""
    if isinstance(layer, CBAM):
        spatial = [] if layer.spatial is None else _entries(layer.spatial, channels, prefix + "spatial.")
        return _entries(layer.channel, channels, prefix + "channel.") + spatial
    shapes = layer.weight_shapes(channels)
    return [(prefix + key, layer, attr, layout, _torch_shape(shapes[attr], layout))
            for key, attr, layout in _KEYS[type(layer)] if attr in shapes]


def _check_layer(caller: str, layer: object) -> None:
    if not isinstance(layer, (CBAM, ChannelGate, SpatialGate)):
        raise TypeError(f"{caller}: expected a cbam.keras CBAM, ChannelGate or SpatialGate layer, "
                        f"got {type(layer).__name__}")


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return tuple(_LAYOUTS[layout][1](np.empty(shape, np.float32)).shape)


def _numpy(value: Any) -> np.ndarray:
    """A backend tensor as NumPy, bfloat16 (which NumPy lacks) as float32 (a torch tensor directly: Keras' own
    conversion warns under NumPy 2)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if keras.backend.standardize_dtype(value.dtype) == "bfloat16":
        value = keras.ops.cast(value, "float32")
    return keras.ops.convert_to_numpy(value)


def to_torch(layer: CBAM | ChannelGate | SpatialGate) -> dict[str, torch.Tensor]:
    """The layer's weights as the PyTorch module's state dict, so a Keras-trained CBAM runs in PyTorch.

    Load it strictly into the module with the same options: ``cbam.CBAM(C, preset=...).load_state_dict(sd)``
    (``cbam.ChannelGate`` / ``cbam.SpatialGate`` for the gate layers, whose keys have no ``channel.`` / ``spatial.``).
    """
    _check_layer("to_torch", layer)
    if not layer.built:
        raise ValueError(f"to_torch: expected a built layer, got {type(layer).__name__} {layer.name!r} unbuilt "
                         "(call it on an input or build it first)")
    state: dict[str, torch.Tensor] = {}
    for key, owner, attr, layout, _ in _entries(layer, layer.channels):
        variable = getattr(owner, attr)
        # a C-ordered copy (np.ascontiguousarray would make num_batches_tracked's shape () a (1,))
        array = np.array(_LAYOUTS[layout][1](_numpy(variable.value)), order="C")
        dtype = torch.long if key.endswith("num_batches_tracked") else \
            getattr(torch, keras.backend.standardize_dtype(variable.dtype))  # bfloat16 back from float32
        state[key] = torch.from_numpy(array).to(dtype)
    return state


def _module_options(module: nn.Module) -> dict[str, object]:
    """The options of a PyTorch CBAM / gate that its state dict does not carry, in the Keras layer's terms."""
    names = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hard_sigmoid"}
    channel = module.channel if isinstance(module, TorchCBAM) else module
    spatial = module.spatial if isinstance(module, TorchCBAM) else module
    options: dict[str, object] = {}
    if isinstance(module, TorchCBAM):
        options["arrangement"] = module.arrangement
    if isinstance(channel, TorchChannelGate):
        options["pool_types"] = tuple(channel.pool_types)
        if channel.fc2 is not None:
            act = channel.act
            options["act_layer"] = "gelu" if isinstance(act, nn.GELU) and act.approximate == "none" else \
                names.get(type(act), type(act).__name__)
        options["gate"] = names.get(type(channel.gate), type(channel.gate).__name__)
    if isinstance(spatial, TorchSpatialGate):
        if not isinstance(module, TorchCBAM):  # a CBAM's gates share one gate function: the channel gate's
            options["gate"] = names.get(type(spatial.gate), type(spatial.gate).__name__)
        if spatial.norm is not None:
            options["bn_momentum"] = spatial.norm.momentum
            options["bn_eps"] = spatial.norm.eps
    return options


def _layer_options(layer: CBAM | ChannelGate | SpatialGate) -> dict[str, object]:
    channel = layer.channel if isinstance(layer, CBAM) else layer
    spatial = layer.spatial if isinstance(layer, CBAM) else layer
    options: dict[str, object] = {}
    if isinstance(layer, CBAM):
        options["arrangement"] = layer.arrangement
    if isinstance(channel, ChannelGate):
        options["pool_types"] = tuple(channel.pool_types)
        if channel.layers == 2:
            options["act_layer"] = channel.act_layer
        options["gate"] = channel.gate
    if isinstance(spatial, SpatialGate):
        if not isinstance(layer, CBAM):
            options["gate"] = spatial.gate
        if spatial.norm:
            options["bn_momentum"] = spatial.bn_momentum
            options["bn_eps"] = spatial.bn_eps
    return options


def _channels_from(layer: Any, state: Mapping[str, np.ndarray]) -> int | None:
    """The channel count a state dict implies for an unbuilt layer (None if it does not say)."""
    prefix = "channel." if isinstance(layer, CBAM) else ""
    if not isinstance(layer, SpatialGate) and prefix + "fc1.weight" in state:
        return int(state[prefix + "fc1.weight"].shape[1])
    if isinstance(layer, SpatialGate) and "compress.weight" in state:
        return int(state["compress.weight"].shape[1])
    return None


def from_torch(
    layer: CBAM | ChannelGate | SpatialGate, module_or_state_dict: nn.Module | Mapping[str, Any]
) -> CBAM | ChannelGate | SpatialGate:
    """Load a PyTorch ``cbam.CBAM`` (or gate) module's weights, or its state dict, into the Keras layer; return it.

    Every key and shape is checked before anything is written or built (a missing, unexpected or mis-shaped tensor
    raises a ValueError naming it), so a failed load leaves the layer as it was, an unbuilt layer unbuilt. Given a
    module, the options the weights do not carry (pool types, arrangement, activations, gate, BatchNorm momentum and
    eps) must match too. An unbuilt layer is built for the channel count the weights imply once they are checked.
    bfloat16 weights (the module's or the layer's) go through float32, exactly.
    """
    _check_layer("from_torch", layer)
    source = module_or_state_dict
    if isinstance(source, nn.Module):
        expected_type = next(theirs for ours, theirs in _TORCH_TYPES.items() if isinstance(layer, ours))
        if not isinstance(source, expected_type):
            raise TypeError(f"from_torch: a Keras {type(layer).__name__} takes a cbam.{expected_type.__name__} "
                            f"module or its state dict, got {type(source).__name__}")
        theirs, ours = _module_options(source), _layer_options(layer)
        for option, value in theirs.items():
            if option in ours and ours[option] != value:
                raise ValueError(f"from_torch: the module's {option} is {value!r}, the layer's {ours[option]!r}; "
                                 "build the layer with the module's options")
        source = source.state_dict()
    elif not isinstance(source, Mapping):
        raise TypeError(f"from_torch: expected a PyTorch module or a state dict, got {type(source).__name__}")
    state = {key: _numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value)
             for key, value in source.items()}
    channels = layer.channels if layer.channels is not None else _channels_from(layer, state)
    if channels is None:
        raise ValueError(f"from_torch: expected a built layer or a channel count, got {type(layer).__name__} "
                         f"{layer.name!r} unbuilt with channels=None (build it on an input first)")
    entries = _entries(layer, channels)  # the shapes the layer has, or would have once built: checked first
    expected = {key for key, *_ in entries}
    missing = [key for key, *_ in entries if key not in state]
    if missing:
        raise ValueError(f"from_torch: missing key {missing[0]!r} for this {type(layer).__name__} "
                         f"(expected keys {sorted(expected)}, got {sorted(state)})")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ValueError(f"from_torch: unexpected key {unexpected[0]!r} for this {type(layer).__name__} "
                         f"(expected keys {sorted(expected)}); build the layer with the module's options")
    for key, _, _, _, want in entries:
        if tuple(state[key].shape) != want:
            raise ValueError(f"from_torch: {key} has shape {tuple(state[key].shape)}, expected {want} for this "
                             f"{type(layer).__name__}")
    if not layer.built:
        shape = (None, None, None, channels) if layer.data_format == "channels_last" else (None, channels, None, None)
        layer.build(shape)
    for key, owner, attr, layout, _ in entries:
        # assign casts to the variable's dtype (bfloat16, float64, int32 for num_batches_tracked)
        getattr(owner, attr).assign(np.array(_LAYOUTS[layout][0](state[key]), order="C"))
    return layer
