"""A fused, memory-lean computation path for :class:`~cbam.layers.cbam.CBAM`.

It computes what the reference forward computes (``F' = sigmoid(Mc(F)) * F``, ``F'' = sigmoid(Ms(F')) * F'``) in
one custom :class:`torch.autograd.Function`, without materialising the channel-refined map ``F'`` and without
keeping any full-size intermediate for backward. Entry points: :func:`fused_supported` (None, or why a configuration
needs the reference path), :func:`cbam_fused` (the computation, for a CBAM module and an input, optionally with a
residual block's tail ``relu(. + residual)`` and the BatchNorm in front of the module, which the CPU kernels fold
into their reads), :func:`norm_folds` (whether that BatchNorm is folded) and :func:`fused_path` (which
formulation runs).

Three formulations compute the full-size passes: the hand-written CPU kernels (``fused_cpu.py``, the default on the
CPU, in eager mode and under torch.compile); PyTorch operators on cache-sized blocks (described below: CUDA, and
CPUs where the kernels cannot be built); plain tensor expressions for Inductor (under torch.compile without the
CPU kernels, Triton on a GPU). The small parts (MLP, BatchNorm of the spatial logits, their backward) are shared.

* Forward reads ``x`` three times at most and writes the output once: the channel pools (avg, max over H x W), the
  tiny MLP giving the channel gate ``gc`` (N, C), the spatial pools of ``y = x * gc`` over C (mean and max, block by
  block, so the product never leaves the cache), the k x k convolution (+ BatchNorm) giving the spatial gate ``gs``
  (N, H x W), and ``out = (x * gc) * gs``. In eager mode samples are processed in groups that stay in the
  last-level cache, so the channel pools and the spatial pools of a group share one read from memory; without batch
  statistics to wait for (eval mode, or no spatial BatchNorm) a group's output is written in the same sweep.
* Backward gets only ``x`` and tensors of N x C or N x H x W elements (gates, pooled vectors, MLP pre-activations,
  first-max indices, the two spatial maps, BatchNorm statistics), and makes three passes over full-size tensors:
  ``d_gs = sum_c dout * x * gc`` (with, in eager mode, ``sum_hw dout * x * gs`` from the same cached block),
  ``d_gc = sum_hw x * (dout * gs + d_avg_map / C) + max terms``, and ``dx``, written once (the max pools' terms are
  sparse: two small scatters in eager mode, compares inside the pass when compiled).
* Parameters are inputs of the Function and get exact gradients; backward is analytic (no autograd inside), so
  ``torch.compile(fullgraph=True)`` traces it. Eager mode uses aten kernels chosen for speed (vector x matrix
  products for sums over C, channels-last max-pooling views for maxima with indices, forward convolutions for the
  small convolution's backward); under torch.compile a plain formulation is traced, which Inductor fuses into one
  kernel per pass (the first-max indices are found there by min-reductions inside passes that read ``x`` anyway).
  The convolution and its backward are custom operators, opaque to Inductor.

Max pools and ties: the gradient of each max goes to exactly one element, the first maximum in the order of the
pooled dimension (the index ``torch.argmax`` returns: smallest ``h * W + w`` for the channel pool, smallest ``c`` for
the spatial pool). The reference's ``amax`` splits the gradient evenly among exactly tied elements instead, so the
two differ only on inputs with exact ties (e.g. many zeros after a ReLU); forward values never differ.

Small parts (MLP, convolution, BatchNorm, gates) run in float32 for float16/bfloat16 inputs, in the input's dtype
otherwise; autocast is disabled inside, so under autocast the result is that of the float32 computation (closer to
it than the reference's bfloat16 one). Inputs with inf or nan give nan gradients where the reference may not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_feature_map

if TYPE_CHECKING:
    from .cbam import CBAM

__all__ = ["cbam_fused", "fused_path", "fused_supported", "norm_folds"]

# Eager blocking (tuned on a 2-core AMD EPYC with 32 MiB of L3): a group of samples of up to _GROUP_BYTES is pooled
# over H x W and then over C while it is still cached; the other passes work on blocks of about _BLOCK_ELEMS
# elements (large enough that the per-op overhead of eager PyTorch stays small).
_GROUP_BYTES = 16 << 20
_BLOCK_ELEMS = 1 << 21


class _Cfg(NamedTuple):
    avg: bool  # channel pools: avg and/or max (the MLP outputs are summed, so their order does not matter)
    max: bool
    spatial: bool  # False: the channel gate only
    kernel: int
    bn: str  # "none", "batch" (training: batch statistics) or "running" (eval, or a single value per batch)
    eps: float
    pre: str = "none"  # a BatchNorm folded in front of the module: "none", "batch" or "running" (as bn)
    pre_eps: float = 0.0


# --------------------------------------------------------------------------------------------------
# Which configurations the fused path serves
# --------------------------------------------------------------------------------------------------
def fused_supported(module: CBAM) -> str | None:
    """None if the fused path can serve this CBAM configuration, else a short reason (-> reference fallback)."""
    ch = module.channel
    if module.spatial is not None and module.arrangement != "channel_first":
        return f"arrangement {module.arrangement!r} (fused: 'channel_first' only)"
    others = [p for p in ch.pool_types if p not in ("avg", "max")]
    if others:
        return f"channel pool types {tuple(others)} (fused: 'avg' and 'max' only)"
    if type(ch.act) is not nn.ReLU:
        return f"MLP activation {type(ch.act).__name__} (fused: ReLU only)"
    if type(ch.gate) is not nn.Sigmoid:
        return f"channel gate {type(ch.gate).__name__} (fused: Sigmoid only)"
    if type(ch.fc1) is not nn.Linear or type(ch.fc2) is not nn.Linear:
        return "channel MLP layers are not plain nn.Linear"
    sp = module.spatial
    if sp is None:
        return None
    if sp.compress_mode != "pool":
        return f"spatial compression {sp.compress_mode!r} (fused: 'pool' only)"
    if type(sp.gate) is not nn.Sigmoid:
        return f"spatial gate {type(sp.gate).__name__} (fused: Sigmoid only)"
    conv = sp.conv
    k = conv.kernel_size[0]
    if (
        type(conv) is not nn.Conv2d
        or conv.in_channels != 2
        or conv.out_channels != 1
        or conv.kernel_size != (k, k)
        or k % 2 != 1
        or conv.stride != (1, 1)
        or conv.padding != (k // 2, k // 2)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
    ):
        return "spatial convolution is not a plain 2 -> 1 odd k x k 'same' convolution"
    norm = sp.norm
    if norm is not None and (
        not isinstance(norm, nn.BatchNorm2d)
        or norm.num_features != 1
        or not norm.track_running_stats
        or norm.running_mean is None
        or norm.running_var is None
    ):
        return "spatial norm is not a BatchNorm2d(1) that tracks running statistics"
    return None


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def cbam_fused(
    module: CBAM,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    norm: nn.Module | None = None,
    residual_norm: nn.Module | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Same result as module's reference forward (train and eval mode, incl. BN running-stat updates).

    With ``residual`` (a tensor of x's shape and dtype), ``relu(module(x) + residual)``: the tail of a residual block,
    taken into the output pass (the hand-written CPU kernels then write the block's output directly). With ``norm``
    (the BatchNorm in front of the module), ``module(norm(x))``: where :func:`norm_folds` allows, the kernels apply
    the normalisation while they read ``x`` (its statistics, running-statistics update and backward included), so
    the normalised map is never written, read or kept; otherwise ``norm`` runs first. With ``residual_norm`` (the
    BatchNorm of a downsampling shortcut), the residual is ``residual_norm(residual)``: at inference (running
    statistics, no gradients) the output pass applies it as it reads the residual; otherwise it runs first. With
    ``inplace`` (for a caller that does not need ``x`` afterwards, such as a block handing over its convolution's
    output), the single inference operator writes the result into ``x`` and returns it; elsewhere (gradients, batch
    statistics, other paths) ``x`` is left as it was."""
    name = type(module).__name__
    check_feature_map(name, x, module.channels)
    front = None  # the BatchNorm folded into the kernels
    if norm is not None:
        if norm_folds(norm, x):
            front = norm
        else:
            x = norm(x)
    if residual_norm is not None and residual is None:
        raise ValueError(f"{name}: residual_norm needs a residual")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(
            f"{name}: the residual must match the input's shape, dtype and device; expected {tuple(x.shape)} "
            f"{x.dtype} on {x.device}, got {tuple(residual.shape)} {residual.dtype} on {residual.device}"
        )
    reason = fused_supported(module)
    if reason is not None:
        raise ValueError(f"{name}: the fused path does not support {reason}")
    ch, sp = module.channel, module.spatial
    n, _, h, w = x.shape
    sp_norm = None if sp is None else sp.norm
    bn = "none"
    if sp_norm is not None:
        # The reference uses batch statistics only in training and with more than one value per batch.
        bn = "batch" if sp.training and sp_norm.training and n * h * w > 1 else "running"
    cfg = _Cfg(
        avg="avg" in ch.pool_types,
        max="max" in ch.pool_types,
        spatial=sp is not None,
        kernel=0 if sp is None else sp.conv.kernel_size[0],
        bn=bn,
        eps=0.0 if sp_norm is None else float(sp_norm.eps),
    )
    params = (
        ch.fc1.weight,
        ch.fc1.bias,
        ch.fc2.weight,
        ch.fc2.bias,
        None if sp is None else sp.conv.weight,
        None if sp is None else sp.conv.bias,
        None if sp_norm is None else sp_norm.weight,
        None if sp_norm is None else sp_norm.bias,
    )
    stats = (sp_norm.running_mean, sp_norm.running_var) if bn == "running" else (None, None)
    res_front = None  # the shortcut's BatchNorm, folded into the single inference operator's output pass
    if residual_norm is not None:
        norms = (*(() if norm is None else norm.parameters()), *residual_norm.parameters())
        one_operator = bn != "batch" and not _grad_needed(x, residual, *module.parameters(), *norms)
        if one_operator and _shortcut_norm_folds(residual_norm, residual):
            res_front = (*_norm_params(residual_norm), float(residual_norm.eps))
        else:
            residual = residual_norm(residual)
    return _apply(x, residual, params, stats, cfg, sp_norm, bn, front, res_front, inplace)


def _grad_needed(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _norm_params(norm: nn.BatchNorm2d) -> tuple:
    """(weight, bias, running mean, running variance) of a BatchNorm, any of them None where it has none."""
    running = (None, None) if norm.training or norm.running_mean is None else (norm.running_mean, norm.running_var)
    return (norm.weight, norm.bias, *running)


def _shortcut_norm_folds(norm: nn.Module, residual: torch.Tensor) -> bool:
    """True if ``norm`` (the BatchNorm on a shortcut) can be folded into the inference operator's output pass: a plain
    ``nn.BatchNorm2d`` of the residual's channels normalising with its running statistics, not observed by hooks, on
    a CPU input the hand-written kernels serve. (Gradients are checked by the caller.)"""
    from .cbam import _observed

    if type(norm) is not nn.BatchNorm2d or _observed(norm) or norm.training or norm.running_mean is None:
        return False
    return residual.dim() == 4 and norm.num_features == residual.shape[1] and fused_path(residual) == "native"


def _apply(x, residual, params, stats, cfg, sp_norm, bn, front=None, res_front=None, inplace=False):
    """Runs the Function (or, without gradients, its forward) and updates the running statistics of the spatial
    BatchNorm (``sp_norm``) and of the folded one in front (``front``) as BatchNorm would. ``res_front`` (weight,
    bias, running mean, running variance, eps of the shortcut's BatchNorm) comes only without gradients."""
    pre = (None,) * 4
    if front is not None:
        batch = front.training or front.running_mean is None
        cfg = cfg._replace(pre="batch" if batch else "running", pre_eps=float(front.eps))
        pre = _norm_params(front)
    inputs = (x, residual, *params)
    if _grad_needed(*inputs, *pre):
        out, mean, var, pre_mean, pre_var = _CBAMFunction.apply(*inputs, *stats, *pre, cfg)
    else:
        with torch.autocast(x.device.type, enabled=False):
            out, mean, var, pre_mean, pre_var, _, _ = _forward(
                *inputs, *stats, *pre, cfg, need_backward=False, res_front=res_front, inplace=inplace
            )
    if bn == "batch":
        _update_running_stats(sp_norm, mean, var)
    if cfg.pre == "batch" and front.training and front.track_running_stats and front.running_mean is not None:
        _update_running_stats(front, pre_mean, pre_var)
    return out


def norm_folds(norm: nn.Module, x: torch.Tensor) -> bool:
    """True if ``norm`` (the module in front of a CBAM) can be folded into the fused CPU kernels for input ``x``: a
    plain ``nn.BatchNorm2d`` of x's channels, not observed by hooks, on a CPU input the hand-written kernels serve
    (float32, float64, bfloat16, float16; statistics and the normalisation in float32 or float64), with batch
    statistics more than one value per channel. Anything else runs ``norm`` first and gives the same result."""
    from .cbam import _observed

    if type(norm) is not nn.BatchNorm2d or _observed(norm):
        return False
    if x.dim() != 4 or norm.num_features != x.shape[1] or fused_path(x) != "native":
        return False
    batch = norm.training or norm.running_mean is None
    return not batch or x.shape[0] * x.shape[2] * x.shape[3] > 1


@torch.no_grad()
def _update_running_stats(norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> None:
    """What nn.BatchNorm2d does in training: count the batch, blend the batch mean and unbiased variance in."""
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:  # cumulative moving average
        factor = 1.0 / norm.num_batches_tracked.to(mean.dtype)
    else:
        factor = norm.momentum
    norm.running_mean.lerp_(_cast(mean, norm.running_mean.dtype), factor)  # (1 - f) * running + f * batch
    norm.running_var.lerp_(_cast(var, norm.running_var.dtype), factor)


class _CBAMFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, residual, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv, cfg
    ):
        with torch.autocast(x.device.type, enabled=False):
            out, mean, var, pre_mean, pre_var, saved, path = _forward(
                x, residual, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv, cfg, True
            )
        ctx.cfg = cfg
        ctx.path = path
        ctx.has_bias = (b1 is not None, b2 is not None, bc is not None)
        ctx.pre_dtype = None if pre_w is None else pre_w.dtype
        # with a residual, the ReLU's mask comes from the output (kept anyway by whatever consumes it)
        ctx.save_for_backward(x, w1, w2, wc, gamma, pre_w, out if residual is not None else None, *saved)
        ctx.mark_non_differentiable(mean, var, pre_mean, pre_var)
        return out, mean, var, pre_mean, pre_var

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar, _dpre_mean, _dpre_var):  # type: ignore[override]
        x, w1, w2, wc, gamma, pre_w, out, *saved = ctx.saved_tensors
        d_residual = None
        if out is not None:  # through relu(. + residual): the residual gets the masked gradient, and so does CBAM
            dout = d_residual = torch.ops.aten.threshold_backward(dout, out, 0)
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:10])
        with torch.autocast(x.device.type, enabled=False):
            grads = _backward(dout, x, w1, w2, wc, gamma, saved, ctx.cfg, ctx.has_bias, needs, ctx.path, pre_w)
        d_pre = grads[9:] if len(grads) > 9 else [None, None]
        d_pre = [
            _cast(g, ctx.pre_dtype) if g is not None and ctx.needs_input_grad[12 + i] else None
            for i, g in enumerate(d_pre)
        ]
        return (
            grads[0],
            d_residual if ctx.needs_input_grad[1] else None,
            *grads[1:9],
            None,
            None,
            *d_pre,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------
# Helpers shared by the eager and the compiled formulation
# --------------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)  # (a same-dtype .to still costs a dispatch)


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _mlp_forward(pooled, w1, b1, w2, b2):
    """pooled (P, G, C) -> pre-activations (P, G, hidden) and channel gate (G, C); the reference's op sequence."""
    h = F.linear(pooled, w1, b1)
    return h, torch.sigmoid(F.linear(torch.relu(h), w2, b2).sum(0))


def _mlp_backward(d_logit, pooled, h, w1, w2):
    """Gradients of logits = sum_p fc2(relu(fc1(pooled_p))): d_pooled (P, N, C), dW1, db1, dW2, db2."""
    a = torch.relu(h)
    dw2 = d_logit.t() @ a.sum(0)
    db2 = d_logit.sum(0) * h.shape[0]
    d_h = torch.where(h > 0, (d_logit @ w2).unsqueeze(0), 0.0)
    dw1 = d_h.flatten(0, 1).t() @ pooled.flatten(0, 1)
    db1 = d_h.sum((0, 1))
    return d_h @ w1, dw1, db1, dw2, db2


def _stack_maps(savg, smax, shape):
    """The (N, 2, H, W) input of the spatial convolution from the [avg; max] maps (N, HW)."""
    n, h, w = shape
    return torch.stack([savg, smax], 1).view(n, 2, h, w)


def _spatial_forward(maps, wc, bc, gamma, beta, rmean, rvar, cfg, conv=None):
    """[avg; max] maps (N, 2, H, W) -> spatial gate gs (N, HW) and what its backward needs (N x HW or smaller)."""
    n, _, h, w = maps.shape
    z = (conv or torch.ops.cbam_fused.spatial_conv)(maps, wc, bc)
    mean = var = rstd = None
    if cfg.bn == "batch":
        mean = z.mean()
        var = (z - mean).square().mean()  # biased, as BatchNorm normalises with
        rstd = torch.rsqrt(var + cfg.eps)
        z = (z - mean) * rstd
    elif cfg.bn == "running":
        rstd = torch.rsqrt(rvar + cfg.eps)
        z = (z - rmean) * rstd
    zhat = z
    if cfg.bn != "none" and gamma is not None:
        z = z * gamma + beta
    gs = torch.sigmoid(z).view(n, h * w)
    if cfg.bn == "batch":
        m = n * h * w
        var = var * (m / (m - 1))  # unbiased, for the running estimate
    return gs, maps, zhat, rstd, mean, var


def _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias, conv_backward=None):
    """d_gs (N, HW) -> gradients of the two maps (N, HW) each, dW_conv, db_conv, d_gamma, d_beta."""
    n, _, h, w = maps.shape
    d = (d_gs * gs * (1 - gs)).view(n, 1, h, w)
    d_gamma = d_beta = None
    if cfg.bn != "none":
        if gamma is not None:
            d_gamma = (d * zhat).sum().view(1)
            d_beta = d.sum().view(1)
            d = d * gamma
        if cfg.bn == "batch":
            d = (d - d.mean() - zhat * (d * zhat).mean()) * rstd
        else:
            d = d * rstd
    d_maps, d_wc = (conv_backward or torch.ops.cbam_fused.spatial_conv_backward)(d, maps, wc)
    d_bc = d.sum().view(1) if has_conv_bias else None
    return d_maps[:, 0].reshape(n, h * w), d_maps[:, 1].reshape(n, h * w), d_wc, d_bc, d_gamma, d_beta


# The k x k convolution of the two maps, and its backward, as custom operators: opaque to torch.compile, they keep
# Inductor's layout pass (which turns every 4-D tensor near an aten convolution channels-last, copying x and dout)
# out of the graph. (NNPACK is faster for these maps in isolation, but its own thread pool slows the OpenMP kernels
# around it on a 2-core machine.)
@torch.library.custom_op("cbam_fused::spatial_conv", mutates_args=())
def _spatial_conv(maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """'same' k x k convolution of (N, 2, H, W) maps with a (1, 2, k, k) weight; a dense (N, 1, H, W) result."""
    return F.conv2d(maps, weight, bias, padding=weight.shape[-1] // 2).contiguous()


@_spatial_conv.register_fake
def _(maps, weight, bias):
    n, _, h, w = maps.shape
    return maps.new_empty((n, weight.shape[0], h, w))


@torch.library.custom_op("cbam_fused::spatial_conv_backward", mutates_args=())
def _spatial_conv_backward(
    d: torch.Tensor, maps: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of spatial_conv (without bias) for the output gradient d: d_maps (N, 2, H, W), d_weight.

    The generic convolution backward is slow for these maps; both halves as forward convolutions: the input gradient
    correlates d with the flipped kernel, the weight gradient correlates each (sample, map) plane with d, all planes
    at once as a depthwise convolution with d as the kernels."""
    n, _, h, w = maps.shape
    k = weight.shape[-1]
    pad = k // 2
    d_maps = F.conv2d(d, weight.flip(2, 3).transpose(0, 1), padding=pad).contiguous()
    kernels = d.expand(n, 2, h, w).reshape(2 * n, 1, h, w)
    d_weight = F.conv2d(maps.reshape(1, 2 * n, h, w), kernels, padding=pad, groups=2 * n)
    return d_maps, d_weight.view(n, 2, k, k).sum(0, keepdim=True)


@_spatial_conv_backward.register_fake
def _(d, maps, weight):
    return torch.empty_like(maps, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _forward(
    x, residual, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv, cfg, need_backward,
    res_front=None, inplace=False
):
    """Returns out, batch mean and unbiased batch variance of the spatial BatchNorm and of the folded one in front
    (empty unless 'batch'), the tensors to save and the path.

    With a residual, out is relu(cbam(x) + residual) (the native kernels write it in their output pass); with a folded
    BatchNorm in front (cfg.pre, native path only), x is that BatchNorm's input; with ``res_front`` (native path, no
    backward), the residual is the input of the shortcut's BatchNorm; with ``inplace`` (native path, no backward), out
    may be x itself, overwritten."""
    cd = _compute_dtype(x)
    w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv = (
        _cast(t, cd) for t in (w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv)
    )
    if res_front is not None:
        res_front = (*(_cast(t, cd) for t in res_front[:4]), res_front[4])
    small = (wc, bc, gamma, beta, rmean, rvar)
    path = fused_path(x)
    if path == "native":
        from . import fused_cpu

        front = (pre_w, pre_b, pre_rm, pre_rv)
        out, saved, pre_stats = fused_cpu.forward(
            x, residual, w1, b1, w2, b2, small, cfg, need_backward, front, res_front, inplace
        )
        pre_mean, pre_var = (x.new_empty(0, dtype=cd), x.new_empty(0, dtype=cd)) if pre_stats is None else pre_stats
        if saved is None:  # one operator did everything, nothing is kept
            empty = x.new_empty(0, dtype=cd)
            return out, empty, empty.clone(), pre_mean, pre_var, None, path
    else:
        if cfg.pre != "none" or res_front is not None:
            raise RuntimeError(
                "cbam_fused: a BatchNorm in front or on the shortcut is folded only into the CPU kernels"
            )
        pre_mean, pre_var = x.new_empty(0, dtype=cd), x.new_empty(0, dtype=cd)
        if path == "traced":
            out, saved = _forward_traced(x, w1, b1, w2, b2, small, cfg)
        else:
            out, saved = _forward_eager(x, w1, b1, w2, b2, small, cfg, need_backward)
        if residual is not None:
            out = torch.relu(out + residual)
    gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd, mean, var, *front_saved = saved
    # two distinct tensors even when unused: one tensor returned twice from the Function confuses torch.compile
    mean = x.new_empty(0, dtype=cd) if mean is None else mean.detach()
    var = x.new_empty(0, dtype=cd) if var is None else var.detach()
    return out, mean, var, pre_mean, pre_var, (gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd, *front_saved), path


def fused_path(x: torch.Tensor) -> str:
    """Which formulation computes for x: 'native' (hand-written CPU kernels, ``fused_cpu.py``), 'traced' (plain tensor
    expressions for Inductor, under torch.compile) or 'eager' (PyTorch operators on cache-sized blocks)."""
    if _PATH_OVERRIDE is not None:
        return _PATH_OVERRIDE
    compiling = torch.compiler.is_compiling()
    if x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES:
        from .fused_cpu import native_available, native_loaded

        # while tracing, only kernels loaded earlier (CBAM modules load them when built) can be used
        if native_loaded() if compiling else native_available():
            return "native"
    return "traced" if compiling else "eager"


_PATH_OVERRIDE: str | None = None  # tests pin one formulation


_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Eager formulation: aten kernels on cache-sized blocks
# --------------------------------------------------------------------------------------------------
def _max_over_hw(xg4: torch.Tensor, cl: bool, need_idx: bool):
    """Max of a group (G, C, H, W) over H x W and the flat index of its first maximum (or None)."""
    g, c, h, w = xg4.shape
    if not need_idx:
        return xg4.amax((2, 3)), None
    if cl:  # channels vectorised, one pass
        m, idx = F.max_pool2d(xg4, (h, w), return_indices=True)
        return m.reshape(g, c), idx.reshape(g, c)
    # NCHW: the reduced dimension is the contiguous one. Two levels: max over H with W vectorised (a channels-last
    # view of each plane, W as the channel dimension), then the first flat index among the W column maxima.
    rows = g * c
    view = xg4.as_strided((rows, w, h, 1), (h * w, 1, w, w))
    colmax, hidx = F.max_pool2d(view, (h, 1), return_indices=True)
    m, idx = _first_of_column_maxima(colmax.reshape(rows, w), hidx.reshape(rows, w), h * w)
    return m.view(g, c), idx.view(g, c)


def _max_over_c(t: torch.Tensor, cl: bool, need_idx: bool):
    """Max over C of a block t (G, C, P) and the index of its first maximum (or None); t is a dense buffer that is
    contiguous as (G, C, P) (NCHW) or as (G, P, C) (channels-last)."""
    g, c, p = t.shape
    if not need_idx:
        return t.amax(1), None
    if not cl:  # (G, P, C, 1) channels-last view: P vectorised, one pass
        m, idx = F.max_pool2d(t.as_strided((g, p, c, 1), (c * p, 1, p, p)), (c, 1), return_indices=True)
        return m.reshape(g, p), idx.reshape(g, p)
    # C is the contiguous dimension: c = c1 * C2 + c2. Max over c1 with c2 vectorised, then the first among C2.
    c2 = _inner_split(c)
    rows = g * p
    colmax, c1idx = F.max_pool2d(
        t.as_strided((rows, c2, c // c2, 1), (c, 1, c2, c2)), (c // c2, 1), return_indices=True
    )
    m, idx = _first_of_column_maxima(colmax.reshape(rows, c2), c1idx.reshape(rows, c2), c)
    return m.view(g, p), idx.view(g, p)


def _first_of_column_maxima(colmax: torch.Tensor, outer: torch.Tensor, total: int):
    """Second level of a two-level max: colmax (R, K) holds column maxima, outer (R, K) the first (outer) index
    reaching each, so element (r, k) stands for flat index outer * K + k. Returns the row maxima and the smallest
    flat index reaching them. Works on (K, R) copies: reductions over an outer dimension are vectorised."""
    k = colmax.shape[1]
    ct = colmax.t().contiguous()
    m = ct.amax(0)
    flat = (outer.t() * k + torch.arange(k, device=outer.device)[:, None]).to(torch.float32)  # exact below 2**24
    first = torch.where(ct == m, flat, float(total)).amin(0)
    return m, first.long().clamp_(max=total - 1)  # clamp: rows with a nan have no element equal to their max


def _inner_split(c: int) -> int:
    """C2 for the two-level max over a contiguous C: a divisor of c, 8 (the float32 vector width) if possible."""
    divisors = [d for d in range(1, c + 1) if c % d == 0]
    return min(divisors, key=lambda d: (d % 8 != 0, abs(d - 8)))


def _blocks(n: int, c: int, hw: int, budget: int, split: str):
    """(g0, g1, c0, c1, p0, p1) blocks of about budget elements: whole samples while one fits, else one sample split
    along C (split='c') or along H x W (split='p'). A block of x is contiguous in memory if the split follows the
    memory order: 'c' for NCHW, 'p' for channels-last."""
    if c * hw <= budget:
        step = max(1, budget // (c * hw))
        for g0 in range(0, n, step):
            yield g0, min(n, g0 + step), 0, c, 0, hw
    elif split == "c":
        step = max(1, budget // hw)
        for g0 in range(n):
            for c0 in range(0, c, step):
                yield g0, g0 + 1, c0, min(c, c0 + step), 0, hw
    else:
        step = max(1, budget // c)
        for g0 in range(n):
            for p0 in range(0, hw, step):
                yield g0, g0 + 1, 0, c, p0, min(hw, p0 + step)


class _Scratch:
    """One reusable block buffer per pass: a fresh multi-megabyte tensor per block costs page faults (the allocator
    rarely hands back the block it just freed)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype, self.buf = device, dtype, None

    def __call__(self, *shape: int) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        if self.buf is None or self.buf.numel() < numel:
            self.buf = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self.buf[:numel].view(shape)

    def block(self, g: int, c: int, p: int, cl: bool) -> torch.Tensor:
        """A (G, C, P) block buffer, dense in x's memory order ((G, P, C) row-major for channels-last)."""
        return self(g, p, c).transpose(1, 2) if cl else self(g, c, p)


def _forward_eager(x, w1, b1, w2, b2, small, cfg, need_idx):
    wc, bc, gamma, beta, rmean, rvar = small
    n, c, h, w = x.shape
    hw = h * w
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    cl = _channels_last(x)
    cd = _compute_dtype(x)
    half = cd != x.dtype
    xf = x.flatten(2)
    n_pools = int(cfg.avg) + int(cfg.max)
    pooled = x.new_empty((n_pools, n, c), dtype=cd)
    hpre = x.new_empty((n_pools, n, w1.shape[0]), dtype=cd)
    gc = x.new_empty((n, c), dtype=cd)
    idx_c = x.new_empty((n, c), dtype=torch.long) if cfg.max and need_idx else None
    out = torch.empty_like(x)
    outf = out.flatten(2)
    if cfg.spatial:
        savg, smax = x.new_empty((n, hw), dtype=cd), x.new_empty((n, hw), dtype=cd)
        idx_s = x.new_empty((n, hw), dtype=torch.long) if need_idx else None
    # Without batch statistics a group's spatial gate is final as soon as its maps are: write its output too.
    pipelined = cfg.spatial and cfg.bn != "batch"
    gs_parts, rest_parts = [], []
    split = "p" if cl else "c"
    scratch = _Scratch(x.device, cd)
    group = max(1, min(n, _GROUP_BYTES // max(1, c * hw * x.element_size())))
    for g0 in range(0, n, group):
        g1 = min(n, g0 + group)
        xg4 = x[g0:g1]
        if half:
            xg4 = xg4.to(cd)
        xg = xg4.flatten(2)
        i = 0
        if cfg.avg:
            pooled[i, g0:g1] = xg.sum(2).div_(hw)
            i += 1
        if cfg.max:
            m, idx = _max_over_hw(xg4, cl, need_idx)
            pooled[i, g0:g1] = m
            if idx is not None:
                idx_c[g0:g1] = idx
        hg, gcg = _mlp_forward(pooled[:, g0:g1], w1, b1, w2, b2)
        hpre[:, g0:g1], gc[g0:g1] = hg, gcg
        if not cfg.spatial:
            continue
        for b0, b1_, _, _, p0, p1 in _blocks(g1 - g0, c, hw, _BLOCK_ELEMS, "p"):
            xb = xg[b0:b1_, :, p0:p1]
            gcb = gcg[b0:b1_, :, None]
            t = torch.mul(xb, gcb, out=scratch.block(b1_ - b0, c, p1 - p0, cl))  # dense in x's memory order
            savg[g0 + b0 : g0 + b1_, p0:p1] = t.sum(1).div_(c)
            m, idx = _max_over_c(t, cl, need_idx)
            smax[g0 + b0 : g0 + b1_, p0:p1] = m
            if idx is not None:
                idx_s[g0 + b0 : g0 + b1_, p0:p1] = idx
        if pipelined:
            maps_g = (savg[g0:g1], smax[g0:g1])
            gs_g, *rest = _spatial_forward(_stack_maps(*maps_g, (g1 - g0, h, w)), wc, bc, gamma, beta, rmean, rvar, cfg)
            gs_parts.append(gs_g)
            rest_parts.append(rest)
            for b0, b1_, c0, c1, p0, p1 in _blocks(g1 - g0, c, hw, _BLOCK_ELEMS, split):
                sl = (slice(g0 + b0, g0 + b1_), slice(c0, c1), slice(p0, p1))
                _apply_gates(xf[sl], outf[sl], gc[sl[0], c0:c1], gs_g[b0:b1_, p0:p1])
    if not cfg.spatial:
        for g0, g1, c0, c1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS, split):
            sl = (slice(g0, g1), slice(c0, c1), slice(p0, p1))
            torch.mul(xf[sl], gc[g0:g1, c0:c1, None].to(x.dtype), out=outf[sl])
        return out, (gc, None, pooled, hpre, idx_c, None, None, None, None, None, None)
    if pipelined:
        gs = torch.cat(gs_parts)
        maps = torch.cat([r[0] for r in rest_parts])
        zhat = torch.cat([r[1] for r in rest_parts])
        rstd = rest_parts[0][2]
        mean = var = None
    else:
        spatial = _spatial_forward(_stack_maps(savg, smax, (n, h, w)), wc, bc, gamma, beta, rmean, rvar, cfg)
        gs, maps, zhat, rstd, mean, var = spatial
        for g0, g1, c0, c1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS, split):
            sl = (slice(g0, g1), slice(c0, c1), slice(p0, p1))
            _apply_gates(xf[sl], outf[sl], gc[g0:g1, c0:c1], gs[g0:g1, p0:p1])
    return out, (gc, gs, pooled, hpre, idx_c, idx_s, maps, zhat, rstd, mean, var)


def _apply_gates(xb, ob, gc, gs):
    """ob = (xb * gc) * gs on a block (G, C, P), in the input's dtype and the reference's rounding order."""
    torch.mul(xb, gc.to(xb.dtype)[:, :, None], out=ob)
    ob.mul_(gs.to(xb.dtype)[:, None, :])


def _backward(dout, x, w1, w2, wc, gamma, saved, cfg, has_bias, needs, path, pre_w=None):
    cd = _compute_dtype(x)
    w1c, w2c, wcc, gammac, pre_wc = (_cast(t, cd) for t in (w1, w2, wc, gamma, pre_w))
    if path == "native":
        from . import fused_cpu

        grads = fused_cpu.backward(dout, x, w1c, w2c, wcc, gammac, saved, cfg, has_bias[2], pre_wc)
        return _grads_as_inputs(grads[:9], x, w1, w2, wc, gamma, needs) + grads[9:]
    compiled = path == "traced"
    gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd = saved
    n, c, hgt, wid = x.shape
    hw = hgt * wid
    n_pools = pooled.shape[0]

    # d_gc (N, C) gathers every path through the channel gate; the spatial parts come first.
    if compiled:
        small = (gc, gs, pooled, idx_s, maps, zhat, rstd, wcc, gammac)
        d_gc, idx_c, dx_terms, sgrads = _backward_traced_spatial(dout, x, *small, cfg, has_bias[2])
    else:
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        d_gc, sgrads = _backward_eager_spatial(dout, x, gc, gs, idx_s, maps, zhat, rstd, wcc, gammac, cfg, has_bias[2])
    d_logit = d_gc * gc * (1 - gc)
    d_pooled, dw1, db1, dw2, db2 = _mlp_backward(d_logit, pooled, h, w1c, w2c)
    d_avg = d_pooled[0] * (1.0 / hw) if cfg.avg else None
    d_max = d_pooled[n_pools - 1] if cfg.max else None

    dx = None
    if needs[0]:
        if compiled:
            dx = _dx_traced(dout, x, gc, gs, d_avg, d_max, idx_c, dx_terms)
        else:
            dx = _dx_eager(dout, x, gc, gs, idx_c, idx_s, d_avg, d_max, sgrads, cfg)
    d_wc, d_bc, d_gamma, d_beta = sgrads[2:] if sgrads is not None else (None,) * 4
    grads = [dx, dw1, db1, dw2, db2, d_wc, d_bc, d_gamma, d_beta]
    return _grads_as_inputs(grads, x, w1, w2, wc, gamma, needs)


def _grads_as_inputs(grads, x, w1, w2, wc, gamma, needs):
    """Each gradient in its input's dtype; None where the input needs none."""
    dtypes = [x.dtype, w1.dtype, w1.dtype, w2.dtype, w2.dtype]
    dtypes += [None, None, None, None] if wc is None else [wc.dtype, wc.dtype]
    dtypes += [None, None] if gamma is None else [gamma.dtype, gamma.dtype]
    return [_cast(g, dtypes[i]) if g is not None and needs[i] else None for i, g in enumerate(grads)]


def _backward_eager_spatial(dout, x, gc, gs, idx_s, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias):
    """d_gc (N, C) (all terms) and the spatial parameters' gradients; two passes over x (one also over dout)."""
    n, c, h, w = x.shape
    hw = h * w
    cd = gc.dtype
    half = cd != x.dtype
    cl = _channels_last(x)
    xf, df = x.flatten(2), dout.flatten(2)
    d_gc = x.new_zeros((n, c), dtype=cd)
    if not cfg.spatial:  # d_gc = sum_hw dout * x
        scratch = _Scratch(x.device, cd)
        for g0, g1, c0, c1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS, "p" if cl else "c"):
            xb, db = xf[g0:g1, c0:c1, p0:p1], df[g0:g1, c0:c1, p0:p1]
            if half:
                xb, db = xb.to(cd), db.to(cd)
            d_gc[g0:g1, c0:c1] += torch.mul(db, xb, out=scratch.block(*xb.shape, cl)).sum(2)
        return d_gc, None
    # Pass 1: t = dout * x per block; d_gs = sum_c gc * t and d_gc += sum_hw gs * t, both read t from the cache.
    d_gs = x.new_empty((n, hw), dtype=cd)
    scratch = _Scratch(x.device, cd)
    for g0, g1, _, _, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS, "p"):
        xb, db = xf[g0:g1, :, p0:p1], df[g0:g1, :, p0:p1]
        if half:
            xb, db = xb.to(cd), db.to(cd)
        t = torch.mul(db, xb, out=scratch.block(g1 - g0, c, p1 - p0, cl))  # dense in x's memory order
        # vector x matrix products (fast gemv forms for either memory order)
        d_gs[g0:g1, p0:p1] = torch.bmm(gc[g0:g1, None, :], t).squeeze(1)
        d_gc[g0:g1] += torch.bmm(gs[g0:g1, None, p0:p1], t.transpose(1, 2)).squeeze(1)
    sgrads = _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias)
    d_savg, d_smax = sgrads[0] / c, sgrads[1]
    # Pass 2: the average map's term sum_hw d_savg * x (a vector x matrix product), and the max map's sparse one.
    if half:
        for g0, g1, _, _, _, _ in _blocks(n, c, hw, _GROUP_BYTES // 4, "p"):
            d_gc[g0:g1] += torch.bmm(d_savg[g0:g1, None, :], xf[g0:g1].to(cd).transpose(1, 2)).squeeze(1)
    else:
        d_gc += torch.bmm(d_savg[:, None, :], xf.transpose(1, 2)).squeeze(1)
    x_at_max = xf.gather(1, idx_s[:, None, :]).squeeze(1).to(cd)
    d_gc.scatter_add_(1, idx_s, x_at_max * d_smax)
    return d_gc, (d_savg, d_smax, *sgrads[2:])


def _dx_eager(dout, x, gc, gs, idx_c, idx_s, d_avg, d_max, sgrads, cfg):
    """dx = gc * (dout * gs + d_savg) + d_avg + the two max pools' sparse terms: one write, two small scatters."""
    n, c, h, w = x.shape
    hw = h * w
    cd = gc.dtype
    half = cd != x.dtype
    cl = _channels_last(x)
    dx = torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)
    dxf, df = dx.flatten(2), dout.flatten(2)
    d_savg = sgrads[0] if cfg.spatial else None
    scratch = _Scratch(x.device, cd)
    for g0, g1, c0, c1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS, "p" if cl else "c"):
        db, ob = df[g0:g1, c0:c1, p0:p1], dxf[g0:g1, c0:c1, p0:p1]
        tb = scratch.block(*ob.shape, cl) if half else ob
        if cfg.spatial:
            torch.mul(db, gs[g0:g1, None, p0:p1], out=tb)
            tb.add_(d_savg[g0:g1, None, p0:p1]).mul_(gc[g0:g1, c0:c1, None])
        else:
            torch.mul(db, gc[g0:g1, c0:c1, None], out=tb)
        if d_avg is not None:
            tb.add_(d_avg[g0:g1, c0:c1, None])
        if half:
            ob.copy_(tb)
    if cfg.spatial:
        d_smax = sgrads[1]
        dxf.scatter_add_(1, idx_s[:, None, :], (gc.gather(1, idx_s) * d_smax)[:, None, :].to(x.dtype))
    if d_max is not None:
        dxf.scatter_add_(2, idx_c[:, :, None], d_max[:, :, None].to(x.dtype))
    return dx


# --------------------------------------------------------------------------------------------------
# Traced formulation (torch.compile): plain tensor expressions that Inductor fuses, one kernel per pass
# --------------------------------------------------------------------------------------------------
class _Layout:
    """3-D views of (N, C, H, W) tensors in memory order, (N, C, HW) for NCHW and (N, HW, C) for channels-last, so
    that Inductor's loops run along memory (4-D views would also be made channels-last near a convolution), and the
    matching broadcasts of per-channel (N, C) and per-position (N, HW) tensors."""

    def __init__(self, x: torch.Tensor) -> None:
        self.cl = _channels_last(x)
        self.shape = x.shape
        self.c_dim, self.p_dim = (2, 1) if self.cl else (1, 2)

    def big(self, t: torch.Tensor) -> torch.Tensor:
        n, c, h, w = self.shape
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c) if self.cl else t.reshape(n, c, h * w)

    def unbig(self, t: torch.Tensor) -> torch.Tensor:
        n, c, h, w = self.shape
        return t.view(n, h, w, c).permute(0, 3, 1, 2) if self.cl else t.view(n, c, h, w)

    def chan(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, None, :] if self.cl else v[:, :, None]

    def pos(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, :, None] if self.cl else v[:, None, :]

    def index(self, size: int, dim: int, device: torch.device) -> torch.Tensor:
        """0 .. size-1 (int32: half the vector work of int64 in the fused kernels) along dim of the 3-D view."""
        shape = [1, 1, 1]
        shape[dim] = size
        return torch.arange(size, device=device, dtype=torch.int32).view(shape)


def _forward_traced(x, w1, b1, w2, b2, small, cfg):
    wc, bc, gamma, beta, rmean, rvar = small
    n, c, h, w = x.shape
    cd = _compute_dtype(x)
    lay = _Layout(x)
    xb = lay.big(x)
    pools = []
    if cfg.avg:
        pools.append(xb.sum(lay.p_dim, dtype=cd) / (h * w))
    if cfg.max:  # the index of the first maximum is found in backward, in the pass that sums x over H x W anyway
        pools.append(xb.amax(lay.p_dim).to(cd))
    pooled = torch.stack(pools)
    hpre, gc = _mlp_forward(pooled, w1, b1, w2, b2)
    gcx = lay.chan(gc.to(x.dtype))
    if not cfg.spatial:
        return lay.unbig(xb * gcx), (gc, None, pooled, hpre, None, None, None, None, None, None, None)
    y = (xb * gcx).to(cd)  # never stored: Inductor recomputes it inside the reductions
    savg = y.sum(lay.c_dim) / c
    smax = y.amax(lay.c_dim)
    idx_s = torch.where(y == lay.pos(smax), lay.index(c, lay.c_dim, x.device), c).amin(lay.c_dim)
    maps = _stack_maps(savg, smax, (n, h, w))
    gs, maps, zhat, rstd, mean, var = _spatial_forward(maps, wc, bc, gamma, beta, rmean, rvar, cfg)
    out = xb * gcx * lay.pos(gs.to(x.dtype))
    return lay.unbig(out), (gc, gs, pooled, hpre, None, idx_s, maps, zhat, rstd, mean, var)


def _backward_traced_spatial(dout, x, gc, gs, pooled, idx_s, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias):
    """d_gc, the channel first-max index, what dx needs from the spatial branch, the spatial parameters' gradients.

    Two kernels read full-size tensors here: d_gs = sum_c dout * y (dout and x), then d_gc = sum_hw x * u (dout and x)
    together with the index of each channel's first maximum; dx is the third."""
    n, c, h, w = x.shape
    hw = h * w
    cd = gc.dtype
    lay = _Layout(x)
    xb = lay.big(x)
    xc, dc = xb.to(cd), lay.big(dout).to(cd)

    def first_max_over_hw(zero: torch.Tensor | None) -> torch.Tensor | None:
        if not cfg.max:
            return None
        # zero: exact zeros, per position, computed late in backward; x + zero has x's values (for finite x) but the
        # iteration space and dependencies of the d_gc pass, so Inductor fuses this search into that pass instead
        # of reading x once more.
        xz = xc if zero is None else xc + zero
        hw_index = lay.index(hw, lay.p_dim, x.device)
        return torch.where(xz == lay.chan(pooled[-1]), hw_index, hw).amin(lay.p_dim)

    if not cfg.spatial:
        return (xc * dc).sum(lay.p_dim), first_max_over_hw(None), None, None
    # Bit-identical to the forward's product (x * gc there). The swapped operands keep the joint graph from merging
    # the two, which would make the partitioner save the full-size product instead of recomputing it from x.
    y = (lay.chan(gc.to(x.dtype)) * xb).to(cd)
    d_gs = (dc * y).sum(lay.c_dim)
    sgrads = _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias)
    # small tensors are inlined into the full-size kernels: a multiply there is cheaper than a division
    d_savg, d_smax = lay.pos(sgrads[0] * (1.0 / c)), lay.pos(sgrads[1])
    is_max = lay.index(c, lay.c_dim, x.device) == lay.pos(idx_s)
    u = dc * lay.pos(gs) + d_savg + torch.where(is_max, d_smax, 0.0)
    d_gc = (xc * u).sum(lay.p_dim)
    idx_c = first_max_over_hw(d_smax * 0.0)
    return d_gc, idx_c, (idx_s, d_savg, d_smax), (None, None, *sgrads[2:])


def _dx_traced(dout, x, gc, gs, d_avg, d_max, idx_c, terms):
    """dx, written with other sub-expressions than u in d_gc: a shared full-size node would be materialised."""
    c, h, w = x.shape[1:]
    lay = _Layout(x)
    gcv = lay.chan(gc)
    dc = lay.big(dout).to(gc.dtype)
    if terms is None:
        dx = dc * gcv
    else:
        idx_s, d_savg, d_smax = terms
        is_max = lay.index(c, lay.c_dim, x.device) == lay.pos(idx_s)
        dx = dc * (lay.pos(gs) * gcv) + gcv * d_savg + torch.where(is_max, gcv * d_smax, 0.0)
    if d_avg is not None:
        dx = dx + lay.chan(d_avg)
    if d_max is not None:
        is_max = lay.index(h * w, lay.p_dim, x.device) == lay.chan(idx_c)
        dx = dx + torch.where(is_max, lay.chan(d_max), 0.0)
    return lay.unbig(dx.to(x.dtype))
