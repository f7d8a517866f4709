"""Memory-saving composition of a block's last BatchNorm with its attention module.

In a plain ResNet block the last BN's output is not kept for backward (BN keeps its input; the residual add
keeps nothing). Any attention module placed after it has to keep that output, one more activation per block.
With ``memory_efficient=True`` on the attention module, ``attn(norm(x))`` runs under activation
checkpointing: only ``x`` is kept (which the BN keeps anyway) and both BN and attention are recomputed in
the backward pass, so the network saves what the plain network saves. The recomputation must not update
BatchNorm running statistics a second time; ``_frozen_running_stats`` makes sure of that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _frozen_running_stats(*modules: nn.Module) -> Iterator[None]:
    """BatchNorms inside ``modules`` normalise with batch statistics but leave their running ones alone."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _recomputed(fn, norm: nn.Module, attn: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs) under activation checkpointing, without a second update of the BatchNorm statistics."""
    return checkpoint(
        fn,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _frozen_running_stats(norm, attn)),
    )


def _lean(attn: nn.Module, x: torch.Tensor) -> bool:
    return getattr(attn, "memory_efficient", False) and torch.is_grad_enabled() and x.requires_grad


def norm_then_attention(norm: nn.Module, attn: nn.Module, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``attn(norm(x))``, recomputed in backward instead of stored when ``attn.memory_efficient`` is set; an attention
    module with a ``norm_forward`` method (CBAM) applies the norm itself (the fused CBAM folds it into its kernels).
    ``inplace``: nothing else holds ``x``, which the fused CBAM may then overwrite at inference (see
    :func:`residual_tail`)."""
    if _lean(attn, x):
        return _recomputed(lambda t: attn(norm(t)), norm, attn, x)
    fused = getattr(attn, "norm_forward", None)
    return fused(x, norm, inplace=inplace) if fused is not None else attn(norm(x))


def split_shortcut(
    downsample: nn.Module | None, x: torch.Tensor, attn: nn.Module
) -> tuple[torch.Tensor, nn.Module | None]:
    """A block's shortcut as (tensor, BatchNorm still to apply to it or None). Before an attention module that can
    take it (one with ``residual_relu``, CBAM), a downsampling ``nn.Sequential`` ending with a BatchNorm
    (torchvision's ``conv1x1, BatchNorm2d``) runs without its last module, which the fused CBAM can then fold into
    its output pass (see :func:`residual_tail`). Any other shortcut, or one whose modules are observed by hooks,
    runs whole."""
    from .cbam import _observed

    if downsample is None:
        return x, None
    if (
        getattr(attn, "residual_relu", None) is not None
        and isinstance(downsample, nn.Sequential)
        and len(downsample) > 1
        and isinstance(downsample[-1], nn.BatchNorm2d)
        and not any(_observed(m) for m in (downsample, downsample[-1]))
    ):
        for module in list(downsample)[:-1]:
            x = module(x)
        return x, downsample[-1]
    return downsample(x), None


def unobserved(module: nn.Module) -> bool:
    """True if no forward hook (the module's own or a global one) sees the module's call: its output then goes to
    its caller alone, which may let :func:`residual_tail` overwrite it (``inplace``)."""
    from .cbam import _observed

    return not _observed(module)


def residual_tail(
    norm: nn.Module,
    attn: nn.Module,
    x: torch.Tensor,
    shortcut: torch.Tensor,
    shortcut_norm: nn.Module | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``relu(attn(norm(x)) + shortcut_norm(shortcut))``, the end of a residual block (``shortcut_norm`` optional).

    An attention module with a ``residual_relu`` method (CBAM) performs the normalisations, the addition and the ReLU
    itself: the fused CBAM folds the BatchNorm into its kernels' reads, at inference the shortcut's BatchNorm into
    its output pass, and writes the block's output in that pass. With ``attn.memory_efficient`` only
    ``attn(norm(x))`` is recomputed in backward and the addition and ReLU follow it (recomputing them too would mean
    keeping the shortcut, which the plain network does not keep in a downsampling block).

    ``inplace=True`` says that nothing else holds ``x`` (a block passes its last convolution's output, when no hook
    sees that convolution): at inference the fused CBAM then writes the block's output over ``x``, as a compiled
    plain network's BatchNorm, addition and ReLU do over the convolution's output, so the output pass writes lines
    that are already in the cache instead of a new tensor.
    """
    fused = getattr(attn, "residual_relu", None)
    if fused is not None and not _lean(attn, x):
        return fused(x, shortcut, norm=norm, shortcut_norm=shortcut_norm, inplace=inplace)
    shortcut = shortcut if shortcut_norm is None else shortcut_norm(shortcut)
    if _lean(attn, x):
        return torch.relu_(norm_then_attention(norm, attn, x) + shortcut)
    return torch.relu_(attn(norm(x)) + shortcut)
