"""CBAM's fused computation on the CPU: one custom :class:`torch.autograd.Function` over the hand-written kernels.

It computes what the reference forward (``cbam.layers.cbam``) computes, ``F' = sigmoid(Mc(F)) * F`` and
``F'' = sigmoid(Ms(F')) * F'``, without materialising the channel-refined map ``F'`` and keeping for backward only
the input and tensors of N x C or N x H x W elements (gates, pooled vectors, MLP pre-activations, first-max indices,
the two spatial maps, BatchNorm statistics). Forward reads ``x`` about three times and writes the output once;
backward makes three passes over full-size tensors (see ``kernels.py``). Parameters are inputs of the Function and get
exact gradients; backward is analytic, and every operator is a ``torch.ops.cbam_cpu`` custom operator with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces it without graph breaks.

Entry points: :func:`cpu_kernel` (what ``CBAM.forward`` dispatches to on the CPU: the kernels where they serve, None
where the reference path must run), :func:`supported` (None, or why a configuration needs the reference path),
:func:`cbam_fused` (the computation, optionally with a residual block's tail ``relu(. + residual)`` and the BatchNorm in
front of the module folded into the kernels' reads; the fused blocks call it) and :func:`norm_folds`.

Max pools and ties: the gradient of each max goes to exactly one element, the first maximum in the order of the
pooled dimension (the index ``torch.argmax`` returns: smallest ``h * W + w`` for the channel pool, smallest ``c`` for
the spatial pool). The reference's ``amax`` splits the gradient evenly among exactly tied elements instead, so the
two differ only on inputs with exact ties (e.g. many zeros after a ReLU); forward values never differ.

Small parts (MLP, convolution, BatchNorm, gates) run in float32 for float16/bfloat16 inputs, in the input's dtype
otherwise; autocast is disabled inside, so under autocast the result is that of the float32 computation (closer to
it than the reference's bfloat16 one). Inputs with inf or nan give nan gradients where the reference may not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..layers._checks import check_feature_map
from ..layers.cbam import CBAM
from ..layers.dispatch import kernel_for
from . import kernels, native
from .native import compute_dtype

__all__ = ["NATIVE_DTYPES", "cbam_fused", "cpu_kernel", "hooked", "norm_folds", "serves", "supported"]

NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _Cfg(NamedTuple):
    avg: bool  # channel pools: avg and/or max (the MLP outputs are summed, so their order does not matter)
    max: bool
    spatial: bool  # False: the channel gate only
    kernel: int
    bn: str  # "none", "batch" (training: batch statistics) or "running" (eval, or a single value per batch)
    eps: float
    pre: str = "none"  # a BatchNorm folded in front of the module: "none", "batch" or "running" (as bn)
    pre_eps: float = 0.0




# ----------------------------------------------------------------------------------------------------------------------
# Which configurations and maps the kernels serve
# ----------------------------------------------------------------------------------------------------------------------
def supported(module: CBAM) -> str | None:
    """None if the kernels can compute this CBAM configuration, else a short reason (the reference path runs)."""
    ch = module.channel
    if module.spatial is not None and module.arrangement != "channel_first":
        return f"arrangement {module.arrangement!r} (kernels: 'channel_first' only)"
    if ch.fc2 is None:
        return "a single-layer channel gate (fc2 is None, preset 'ultralytics') (kernels: the two-layer MLP only)"
    others = [p for p in ch.pool_types if p not in ("avg", "max")]
    if others:
        return f"channel pool types {tuple(others)} (kernels: 'avg' and 'max' only)"
    if type(ch.act) is not nn.ReLU:
        return f"MLP activation {type(ch.act).__name__} (kernels: ReLU only)"
    if type(ch.gate) is not nn.Sigmoid:
        return f"channel gate {type(ch.gate).__name__} (kernels: Sigmoid only)"
    if type(ch.fc1) is not nn.Linear or type(ch.fc2) is not nn.Linear:
        return "channel MLP layers are not plain nn.Linear"
    sp = module.spatial
    if sp is None:
        return None
    if sp.compress_mode != "pool":
        return f"spatial compression {sp.compress_mode!r} (kernels: 'pool' only)"
    if type(sp.gate) is not nn.Sigmoid:
        return f"spatial gate {type(sp.gate).__name__} (kernels: Sigmoid only)"
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
        type(norm) is not nn.BatchNorm2d
        or norm.num_features != 1
        or not norm.track_running_stats
        or norm.running_mean is None
        or norm.running_var is None
    ):
        return "spatial norm is not a plain BatchNorm2d(1) that tracks running statistics"
    return None


def hooked(module: nn.Module) -> bool:
    """True if a forward or backward hook of ``module`` or of a module inside it would see a call. The kernels do not
    call those modules, so while one is observed the modules run on their own. Global module hooks (which tools such as
    ``FlopCounterMode`` register to follow the module tree) do not count: they see the modules that run."""
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in module.modules()
    )


def serves(x: torch.Tensor) -> bool:
    """True if the kernels compute for the map ``x``: a CPU tensor of a dtype they take, outside
    ``cbam.layers.reference_only()`` (the fused blocks then run their plain forward, so every CBAM computes its
    reference path), the kernels built (the first call builds them) and, under torch.compile, autocast off (Dynamo
    loses the autocast state around the float32 region of the Function; the reference path runs there until that is
    solved)."""
    if x.device.type != "cpu" or x.dtype not in NATIVE_DTYPES or kernel_for(x) is None:
        return False
    if torch.compiler.is_compiling() and torch.is_autocast_enabled("cpu"):
        return False
    return native.ready()


def cpu_kernel(module: CBAM, x: torch.Tensor) -> torch.Tensor | None:
    """CBAM's CPU kernel for the dispatch table: the fused computation where it serves, else None (the module then
    computes its reference path)."""
    # a hook on the module itself sees its output either way; one on a gate's module would miss its call
    if not serves(x) or supported(module) is not None or any(hooked(m) for m in module.children()):
        return None
    return cbam_fused(module, x)


# ----------------------------------------------------------------------------------------------------------------------
# The computation
# ----------------------------------------------------------------------------------------------------------------------
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
    reason = supported(module)
    if reason is not None:
        raise ValueError(f"{name}: the fused CPU kernels do not compute {reason}")
    if not native.ready():
        raise RuntimeError(f"{name}: the fused CPU kernels are not available: {native.native_status()}")
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
    if type(norm) is not nn.BatchNorm2d or hooked(norm) or norm.training or norm.running_mean is None:
        return False
    return residual.dim() == 4 and norm.num_features == residual.shape[1] and serves(residual)


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
            out, mean, var, pre_mean, pre_var, _ = _forward(
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
    if type(norm) is not nn.BatchNorm2d or hooked(norm):
        return False
    if x.dim() != 4 or norm.num_features != x.shape[1] or not serves(x):
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
            out, mean, var, pre_mean, pre_var, saved = _forward(
                x, residual, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv, cfg, True
            )
        ctx.cfg = cfg
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
            grads = _backward(dout, x, w1, w2, wc, gamma, saved, ctx.cfg, ctx.has_bias, needs, pre_w)
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




def _forward(
    x, residual, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv, cfg, need_backward,
    res_front=None, inplace=False
):
    """Returns out, batch mean and unbiased batch variance of the spatial BatchNorm and of the folded one in front
    (empty unless 'batch') and the tensors to save (None when one operator did everything).

    With a residual, out is relu(cbam(x) + residual) (the kernels write it in their output pass); with a folded
    BatchNorm in front (cfg.pre), x is that BatchNorm's input; with ``res_front`` (no backward), the residual is the
    input of the shortcut's BatchNorm; with ``inplace`` (no backward), out may be x itself, overwritten."""
    cd = compute_dtype(x)
    w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv = (
        _cast(t, cd) for t in (w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, pre_w, pre_b, pre_rm, pre_rv)
    )
    if res_front is not None:
        res_front = (*(_cast(t, cd) for t in res_front[:4]), res_front[4])
    small = (wc, bc, gamma, beta, rmean, rvar)
    front = (pre_w, pre_b, pre_rm, pre_rv)
    out, saved, pre_stats = kernels.forward(
        x, residual, w1, b1, w2, b2, small, cfg, need_backward, front, res_front, inplace
    )
    pre_mean, pre_var = (x.new_empty(0, dtype=cd), x.new_empty(0, dtype=cd)) if pre_stats is None else pre_stats
    if saved is None:  # one operator did everything, nothing is kept
        empty = x.new_empty(0, dtype=cd)
        return out, empty, empty.clone(), pre_mean, pre_var, None
    gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd, mean, var, *front_saved = saved
    # two distinct tensors even when unused: one tensor returned twice from the Function confuses torch.compile
    mean = x.new_empty(0, dtype=cd) if mean is None else mean.detach()
    var = x.new_empty(0, dtype=cd) if var is None else var.detach()
    return out, mean, var, pre_mean, pre_var, (gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd, *front_saved)


def _backward(dout, x, w1, w2, wc, gamma, saved, cfg, has_bias, needs, pre_w=None):
    cd = compute_dtype(x)
    w1c, w2c, wcc, gammac, pre_wc = (_cast(t, cd) for t in (w1, w2, wc, gamma, pre_w))
    grads = kernels.backward(dout, x, w1c, w2c, wcc, gammac, saved, cfg, has_bias[2], pre_wc)
    return _grads_as_inputs(grads[:9], x, w1, w2, wc, gamma, needs) + grads[9:]


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)  # (a same-dtype .to still costs a dispatch)



def _grads_as_inputs(grads, x, w1, w2, wc, gamma, needs):
    """Each gradient in its input's dtype; None where the input needs none."""
    dtypes = [x.dtype, w1.dtype, w1.dtype, w2.dtype, w2.dtype]
    dtypes += [None, None, None, None] if wc is None else [wc.dtype, wc.dtype]
    dtypes += [None, None] if gamma is None else [gamma.dtype, gamma.dtype]
    return [_cast(g, dtypes[i]) if g is not None and needs[i] else None for i, g in enumerate(grads)]


