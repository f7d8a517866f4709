"""Parameter and multiply-accumulate counts in the convention of the CBAM paper's Tables 4 and 5.

Woo et al. (ECCV 2018) report "GFLOPs" that are multiply-accumulates of the convolutions and linear layers
at 224 x 224, batch 1 (pooling, BatchNorm, activations and element-wise products not counted).
``torch.utils.flop_counter.FlopCounterMode`` counts a multiply-add as 2 FLOPs of exactly those operators,
so MACs = its total / 2. Models are built and run on the meta device: no memory, no arithmetic, a
ResNet-101 profiles in well under a second.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._registry import create_model, model_meta

__all__ = ["count_macs", "count_params", "profile_model"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once; buffers such as BN running statistics not counted)."""
    return sum(p.numel() for p in model.parameters())


def _size(input_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = input_size
    return int(h), int(w)


def count_macs(model: nn.Module, input_size: int | tuple[int, int] = (224, 224), in_chans: int = 3) -> int:
    """Multiply-accumulates of conv and linear layers for one image, in eval mode.

    Runs on the device of the model's parameters (use the meta device for speed); the model's training
    mode is restored afterwards.
    """
    h, w = _size(input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, in_chans, h, w, device=device, dtype=dtype)
    was_training = model.training
    # Whichever path computes (the reference on the meta device, the CPU kernels, a fused model's blocks), the count
    # is the same: the kernels register FLOP formulas for exactly the reference path's linear and conv2d work.
    from torch.utils.flop_counter import FlopCounterMode  # here: it loads triton (docs/keras.md, Backends)

    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    if flops % 2:
        raise AssertionError(f"odd FLOP count {flops}: some operator is not a multiply-add")
    return flops // 2


def profile_model(
    name: str,
    *,
    attention: str | type[nn.Module] | None = None,
    input_size: int | tuple[int, int] | None = None,
    **kwargs: Any,
) -> dict[str, int]:
    """``{"params": ..., "macs": ...}`` of registered model ``name``, built on the meta device.

    ``input_size`` defaults to the resolution the model is registered for (224, or 32 for CIFAR models).
    """
    if input_size is None:
        input_size = model_meta(name)["input_size"]
    with torch.device("meta"):
        model = create_model(name, attention=attention, **kwargs)
    return {
        "params": count_params(model),
        "macs": count_macs(model, input_size, in_chans=kwargs.get("in_chans", 3)),
    }
