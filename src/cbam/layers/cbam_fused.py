"""A fused, memory-lean computation path for :class:`~cbam.layers.cbam.CBAM`.

It computes what the reference forward computes (``F' = sigmoid(Mc(F)) * F``, ``F'' = sigmoid(Ms(F')) * F'``) in
one custom :class:`torch.autograd.Function`, without materialising the channel-refined map ``F'`` and without
keeping any full-size intermediate for backward:

* forward reads ``x`` three times at most and writes the output once: the channel pools (avg, max over H x W), the
  tiny MLP giving the channel gate ``gc`` (N, C), the spatial pools of ``y = x * gc`` over C (sum and max, computed
  block by block so that the product never leaves the cache), the k x k convolution (+ BatchNorm) giving the spatial
  gate ``gs`` (N, 1, H, W), and ``out = x * gc * gs``. In eager mode the samples are processed in groups that stay
  in the last-level cache, so the channel pools and the spatial pools of a group share one read from memory; with
  no batch statistics to wait for (eval mode, or no spatial BatchNorm) the output of a group is written in the same
  sweep and forward reads ``x`` once;
* backward saves only ``x`` and tensors of size N x C or N x H x W (gates, pooled vectors, MLP pre-activations,
  argmax indices, the two spatial maps, BatchNorm statistics) and needs four or five passes over full-size tensors:
  ``d_gs = sum_c dout * x * gc`` and ``d_gc = sum_hw dout * x * gs`` (one pass), ``sum_hw x * d_avg_s`` (one pass),
  then ``dx`` in one write plus two sparse scatters for the max pools.

Eager mode uses aten kernels chosen for speed (batched matrix-vector products for the sums over C, channels-last
max pooling views for the max reductions with indices); under ``torch.compile`` a plain formulation is traced
instead, which Inductor fuses into one kernel per pass (there the argmax indices are found in backward, inside the
reductions that read ``x`` anyway).

Max pools and ties: the gradient of each max goes to one element, the first maximum in memory order of the pooled
dimension (the index ``torch.argmax`` returns: smallest ``h * W + w`` for the channel pool, smallest ``c`` for the
spatial pool). The reference's ``amax`` splits the gradient evenly among exactly tied elements instead, so the two
differ only on inputs with exact ties (e.g. after a ReLU, many zeros). Forward values never differ.

Small parts (MLP, convolution, BatchNorm, gates) run in float32 for float16/bfloat16 inputs, in the input's dtype
otherwise; autocast is disabled inside (the result is more accurate than the reference's autocast one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_feature_map

if TYPE_CHECKING:
    from .cbam import CBAM

__all__ = ["cbam_fused", "fused_supported"]

# Eager blocking. A group of samples whose slab fits in the last-level cache is pooled over H x W and then over C
# while it is still cached; element-wise passes work on blocks small enough for the per-core cache.
_GROUP_BYTES = 4 << 20
_BLOCK_ELEMS = 1 << 17


class _Cfg(NamedTuple):
    avg: bool  # channel pools: avg and/or max (the MLP outputs are summed, so their order does not matter)
    max: bool
    spatial: bool  # False: the channel gate only
    kernel: int
    bn: str  # "none", "batch" (training: batch statistics) or "running" (eval, or a single value per batch)
    eps: float


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
def cbam_fused(module: CBAM, x: torch.Tensor) -> torch.Tensor:
    """Same result as module's reference forward (train and eval mode, incl. BN running-stat updates)."""
    name = type(module).__name__
    check_feature_map(name, x, module.channels)
    reason = fused_supported(module)
    if reason is not None:
        raise ValueError(f"{name}: the fused path does not support {reason}")
    ch, sp = module.channel, module.spatial
    n, _, h, w = x.shape
    norm = None if sp is None else sp.norm
    bn = "none"
    if norm is not None:
        # The reference uses batch statistics only in training and with more than one value per batch.
        bn = "batch" if sp.training and norm.training and n * h * w > 1 else "running"
    cfg = _Cfg(
        avg="avg" in ch.pool_types,
        max="max" in ch.pool_types,
        spatial=sp is not None,
        kernel=0 if sp is None else sp.conv.kernel_size[0],
        bn=bn,
        eps=0.0 if norm is None else float(norm.eps),
    )
    params = (
        ch.fc1.weight,
        ch.fc1.bias,
        ch.fc2.weight,
        ch.fc2.bias,
        None if sp is None else sp.conv.weight,
        None if sp is None else sp.conv.bias,
        None if norm is None else norm.weight,
        None if norm is None else norm.bias,
    )
    stats = (norm.running_mean, norm.running_var) if bn == "running" else (None, None)
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        out, mean, var = _CBAMFunction.apply(x, *params, *stats, cfg)
    else:
        with torch.autocast(x.device.type, enabled=False):
            out, mean, var, _ = _forward(x, *params, *stats, cfg, need_backward=False)
    if bn == "batch":
        _update_running_stats(norm, mean, var)
    return out


@torch.no_grad()
def _update_running_stats(norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> None:
    """What nn.BatchNorm2d does in training: count the batch, blend the batch mean and unbiased variance in."""
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:  # cumulative moving average
        factor = 1.0 / norm.num_batches_tracked.to(mean.dtype)
    else:
        factor = norm.momentum
    rm, rv = norm.running_mean, norm.running_var
    rm.copy_(rm * (1 - factor) + mean.to(rm.dtype) * factor)
    rv.copy_(rv * (1 - factor) + var.to(rv.dtype) * factor)


class _CBAMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, cfg):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            out, mean, var, saved = _forward(x, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, cfg, True)
        ctx.cfg = cfg
        ctx.compiled = torch.compiler.is_compiling()
        ctx.has_bias = (b1 is not None, b2 is not None, bc is not None)
        ctx.save_for_backward(x, w1, w2, wc, gamma, *saved)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar):  # type: ignore[override]
        x, w1, w2, wc, gamma, *saved = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grads = _backward(dout, x, w1, w2, wc, gamma, saved, ctx.cfg, ctx.has_bias, ctx.needs_input_grad, ctx.compiled)
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the eager and the compiled formulation
# --------------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


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


def _spatial_forward(savg, smax, wc, bc, gamma, beta, rmean, rvar, cfg, shape):
    """[avg; max] maps (N, HW) -> spatial gate gs (N, HW) and what its backward needs (all N x HW or smaller)."""
    n, h, w = shape
    maps = torch.stack([savg, smax], 1).view(n, 2, h, w)
    z = F.conv2d(maps, wc, bc, padding=cfg.kernel // 2)
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


def _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias):
    """d_gs (N, HW) -> d_maps (N, 2, HW), dW_conv, db_conv, d_gamma, d_beta."""
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
    k = cfg.kernel
    d_maps, d_wc, d_bc = torch.ops.aten.convolution_backward(
        d, maps, wc, [1] if has_conv_bias else None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1,
        [True, True, has_conv_bias],
    )  # fmt: skip
    return d_maps.view(n, 2, h * w), d_wc, d_bc, d_gamma, d_beta


def _forward(x, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, cfg, need_backward):
    """Returns out, batch mean, unbiased batch variance (empty unless bn == 'batch') and the tensors to save."""
    cd = _compute_dtype(x)
    w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar = (
        _cast(t, cd) for t in (w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar)
    )
    small = (wc, bc, gamma, beta, rmean, rvar)
    if torch.compiler.is_compiling():
        out, saved = _forward_traced(x, w1, b1, w2, b2, small, cfg)
    else:
        out, saved = _forward_eager(x, w1, b1, w2, b2, small, cfg, need_backward)
    gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd, mean, var = saved
    empty = x.new_empty(0, dtype=cd)
    mean = empty if mean is None else mean.detach()
    var = empty if var is None else var.detach()
    return out, mean, var, (gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd)


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
    colmax, hidx = colmax.reshape(rows, w), hidx.reshape(rows, w)
    m = colmax.amax(1)
    flat = hidx * w + torch.arange(w, device=xg4.device)
    idx = torch.where(colmax == m[:, None], flat, h * w).amin(1).clamp_(max=h * w - 1)  # clamp: NaN rows
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
    # C is the contiguous dimension: C = C1 x C2, max over C1 with C2 vectorised, then the first among C2.
    c2 = _inner_split(c)
    c1 = c // c2
    rows = g * p
    colmax, c1idx = F.max_pool2d(t.as_strided((rows, c2, c1, 1), (c, 1, c2, c2)), (c1, 1), return_indices=True)
    colmax, c1idx = colmax.reshape(rows, c2), c1idx.reshape(rows, c2)
    m = colmax.amax(1)
    flat = c1idx * c2 + torch.arange(c2, device=t.device)
    idx = torch.where(colmax == m[:, None], flat, c).amin(1).clamp_(max=c - 1)
    return m.view(g, p), idx.view(g, p)


def _inner_split(c: int) -> int:
    """A divisor of c near sqrt(c), preferring multiples of 8 (the vector width) for the vectorised level."""
    divisors = [d for d in range(1, c + 1) if c % d == 0]
    target = max(8.0, c**0.5)
    return min(divisors, key=lambda d: (d % 8 != 0 and d < c, abs(d - target)))


def _blocks(n: int, c: int, hw: int, budget: int):
    """(g0, g1, p0, p1) blocks covering N x HW with about budget elements of N x C x HW each."""
    if c * hw <= budget:
        g = max(1, budget // (c * hw))
        for g0 in range(0, n, g):
            yield g0, min(n, g0 + g), 0, hw
    else:
        p = max(1, budget // c)
        for g0 in range(n):
            for p0 in range(0, hw, p):
                yield g0, g0 + 1, p0, min(hw, p0 + p)


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
        gsz = g1 - g0
        pblock = hw if c * hw * gsz <= _BLOCK_ELEMS else max(1, _BLOCK_ELEMS // (c * gsz))
        for p0 in range(0, hw, pblock):
            p1 = min(hw, p0 + pblock)
            xb = xg[:, :, p0:p1]
            if cl:
                buf = torch.empty((gsz, p1 - p0, c), dtype=cd, device=x.device)
                torch.mul(xb.transpose(1, 2), gcg[:, None, :], out=buf)
                t = buf.transpose(1, 2)
            else:
                t = torch.mul(xb, gcg[:, :, None])
            savg[g0:g1, p0:p1] = t.sum(1).div_(c)
            m, idx = _max_over_c(t, cl, need_idx)
            smax[g0:g1, p0:p1] = m
            if idx is not None:
                idx_s[g0:g1, p0:p1] = idx
        if pipelined:
            gs_g, *rest = _spatial_forward(savg[g0:g1], smax[g0:g1], wc, bc, gamma, beta, rmean, rvar, cfg,
                                           (gsz, h, w))  # fmt: skip
            gs_parts.append(gs_g)
            rest_parts.append(rest)
            _apply_gates(x[g0:g1].flatten(2), outf[g0:g1], gcg, gs_g)
    if not cfg.spatial:
        torch.mul(x, gc.to(x.dtype)[:, :, None, None], out=out)
        return out, (gc, None, pooled, hpre, idx_c, None, None, None, None, None, None)
    if pipelined:
        gs = torch.cat(gs_parts)
        maps = torch.cat([r[0] for r in rest_parts])
        zhat = torch.cat([r[1] for r in rest_parts])
        rstd = rest_parts[0][2]
        mean = var = None
    else:
        gs, maps, zhat, rstd, mean, var = _spatial_forward(savg, smax, wc, bc, gamma, beta, rmean, rvar, cfg,
                                                           (n, h, w))  # fmt: skip
        for g0, g1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS):
            _apply_gates(xf[g0:g1, :, p0:p1], outf[g0:g1, :, p0:p1], gc[g0:g1], gs[g0:g1, p0:p1])
    return out, (gc, gs, pooled, hpre, idx_c, idx_s, maps, zhat, rstd, mean, var)


def _apply_gates(xb, ob, gc, gs):
    """ob = (xb * gc) * gs on a block (G, C, P), in the input's dtype and the reference's rounding order."""
    torch.mul(xb, gc.to(xb.dtype)[:, :, None], out=ob)
    ob.mul_(gs.to(xb.dtype)[:, None, :])


def _backward(dout, x, w1, w2, wc, gamma, saved, cfg, has_bias, needs, compiled):
    cd = _compute_dtype(x)
    w1c, w2c, wcc, gammac = (_cast(t, cd) for t in (w1, w2, wc, gamma))
    gc, gs, pooled, h, idx_c, idx_s, maps, zhat, rstd = saved
    n, c, hgt, wid = x.shape
    hw = hgt * wid
    n_pools = pooled.shape[0]
    need_x = needs[0]

    # d_gc (N, C) gathers every path through the channel gate; the spatial parts come first.
    if compiled:
        d_gc, u, idx_c, sgrads = _backward_traced_spatial(dout, x, gc, gs, pooled, maps, zhat, rstd, wcc, gammac, cfg,
                                                          has_bias[2])  # fmt: skip
    else:
        d_gc, sgrads = _backward_eager_spatial(dout, x, gc, gs, idx_s, maps, zhat, rstd, wcc, gammac, cfg, has_bias[2])
    d_logit = d_gc * gc * (1 - gc)
    d_pooled, dw1, db1, dw2, db2 = _mlp_backward(d_logit, pooled, h, w1c, w2c)
    d_avg = d_pooled[0] / hw if cfg.avg else None
    d_max = d_pooled[n_pools - 1] if cfg.max else None

    dx = None
    if need_x:
        if compiled:
            dx = _dx_traced(x, gc, u, d_avg, d_max, idx_c)
        else:
            dx = _dx_eager(dout, x, gc, gs, idx_c, idx_s, d_avg, d_max, sgrads, cfg)
    d_wc, d_bc, d_gamma, d_beta = sgrads[2:] if sgrads is not None else (None,) * 4
    out = [dx, dw1, db1 if has_bias[0] else None, dw2, db2 if has_bias[1] else None, d_wc, d_bc, d_gamma, d_beta]
    params = [x, w1, None, w2, None, wc, None, gamma, gamma]
    for i, g in enumerate(out):
        if g is None or not needs[i]:
            out[i] = None
        elif i > 0:
            ref = params[i] if params[i] is not None else params[i - 1]
            out[i] = g.to(ref.dtype)
    return out


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
        for g0, g1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS):
            xb, db = xf[g0:g1, :, p0:p1], df[g0:g1, :, p0:p1]
            d_gc[g0:g1] += (db.to(cd) * xb.to(cd) if half else db * xb).sum(2)
        return d_gc, None
    # Pass 1: t = dout * x per block; d_gs = sum_c t * gc and d_gc += sum_hw t * gs, both read t from the cache.
    d_gs = x.new_empty((n, hw), dtype=cd)
    for g0, g1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS):
        xb, db = xf[g0:g1, :, p0:p1], df[g0:g1, :, p0:p1]
        if half:
            xb, db = xb.to(cd), db.to(cd)
        gcb, gsb = gc[g0:g1], gs[g0:g1, p0:p1]
        if cl:
            t = torch.empty((g1 - g0, p1 - p0, c), dtype=cd, device=x.device)  # (G, P, C) row-major
            torch.mul(db.transpose(1, 2), xb.transpose(1, 2), out=t)
            d_gs[g0:g1, p0:p1] = torch.bmm(t, gcb[:, :, None]).squeeze(2)
            d_gc[g0:g1] += torch.bmm(gsb[:, None, :], t).squeeze(1)
        else:
            t = torch.mul(db, xb)  # (G, C, P) row-major
            d_gs[g0:g1, p0:p1] = torch.bmm(gcb[:, None, :], t).squeeze(1)
            d_gc[g0:g1] += torch.bmm(t, gsb[:, :, None]).squeeze(2)
    sgrads = _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias)
    d_maps = sgrads[0]
    d_savg, d_smax = d_maps[:, 0] / c, d_maps[:, 1]
    # Pass 2: the average map's term sum_hw x * d_savg (a batched matrix-vector product), and the max map's sparse one.
    if half:
        for g0, g1, _, _ in _blocks(n, c, hw, _GROUP_BYTES // 4):
            d_gc[g0:g1] += _x_times_map(xf[g0:g1].to(cd), d_savg[g0:g1], cl)
    else:
        d_gc += _x_times_map(xf, d_savg, cl)
    x_at_max = xf.gather(1, idx_s[:, None, :]).squeeze(1).to(cd)
    d_gc.scatter_add_(1, idx_s, x_at_max * d_smax)
    return d_gc, (d_savg, d_smax, *sgrads[1:])


def _x_times_map(xf, v, cl):
    """sum_hw xf[n, c, hw] * v[n, hw] -> (N, C) with one read of xf in its memory order."""
    if cl:
        return torch.bmm(v[:, None, :], xf.transpose(1, 2)).squeeze(1)
    return torch.bmm(xf, v[:, :, None]).squeeze(2)


def _dx_eager(dout, x, gc, gs, idx_c, idx_s, d_avg, d_max, sgrads, cfg):
    """dx = gc * (dout * gs + d_savg) + d_avg + the two max pools' sparse terms: one write, two small scatters."""
    n, c, h, w = x.shape
    hw = h * w
    cd = gc.dtype
    half = cd != x.dtype
    dx = torch.empty_like(x, memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    dxf, df = dx.flatten(2), dout.flatten(2)
    d_avg_b = d_avg[:, :, None] if d_avg is not None else torch.zeros((), dtype=cd, device=x.device)
    if not cfg.spatial:
        if half:
            dxf.copy_(torch.addcmul(d_avg_b, df.to(cd), gc[:, :, None]))
        else:
            torch.addcmul(d_avg_b, df, gc[:, :, None], out=dxf)
    else:
        d_savg, d_smax = sgrads[0], sgrads[1]
        for g0, g1, p0, p1 in _blocks(n, c, hw, _BLOCK_ELEMS):
            db, ob = df[g0:g1, :, p0:p1], dxf[g0:g1, :, p0:p1]
            gsb, dsb = gs[g0:g1, None, p0:p1], d_savg[g0:g1, None, p0:p1]
            gcb, dab = gc[g0:g1, :, None], d_avg_b[g0:g1] if d_avg is not None else d_avg_b
            if half:
                ob.copy_(torch.addcmul(dab, torch.addcmul(dsb, db.to(cd), gsb), gcb))
            else:
                torch.addcmul(dsb, db, gsb, out=ob)
                torch.addcmul(dab, ob, gcb, out=ob)
        dxf.scatter_add_(1, idx_s[:, None, :], (gc.gather(1, idx_s) * d_smax)[:, None, :].to(x.dtype))
    if d_max is not None:
        dxf.scatter_add_(2, idx_c[:, :, None], d_max[:, :, None].to(x.dtype))
    return dx


# --------------------------------------------------------------------------------------------------
# Traced formulation (torch.compile): plain tensor expressions that Inductor fuses, one kernel per pass
# --------------------------------------------------------------------------------------------------
def _forward_traced(x, w1, b1, w2, b2, small, cfg):
    wc, bc, gamma, beta, rmean, rvar = small
    n, c, h, w = x.shape
    cd = _compute_dtype(x)
    pools = []
    if cfg.avg:
        pools.append(x.sum((2, 3), dtype=cd) / (h * w))
    if cfg.max:
        pools.append(x.amax((2, 3)).to(cd))
    pooled = torch.stack(pools)
    hpre, gc = _mlp_forward(pooled, w1, b1, w2, b2)
    gcx = gc.to(x.dtype)[:, :, None, None]
    if not cfg.spatial:
        return x * gcx, (gc, None, pooled, hpre, None, None, None, None, None, None, None)
    y = (x * gcx).to(cd)  # never stored: Inductor recomputes it inside the reductions
    savg = (y.sum(1) / c).view(n, h * w)
    smax = y.amax(1).view(n, h * w)
    gs, maps, zhat, rstd, mean, var = _spatial_forward(savg, smax, wc, bc, gamma, beta, rmean, rvar, cfg, (n, h, w))
    out = x * gcx * gs.to(x.dtype).view(n, 1, h, w)
    return out, (gc, gs, pooled, hpre, None, None, maps, zhat, rstd, mean, var)


def _backward_traced_spatial(dout, x, gc, gs, pooled, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias):
    """d_gc, the factor u with dx = gc * u + (channel-pool terms), the first-max channel index, spatial grads.

    The first-maximum indices are found here, as min-reductions fused into the passes that read x anyway."""
    n, c, h, w = x.shape
    cd = gc.dtype
    xc, dc = x.to(cd), dout.to(cd)
    hw_index = torch.arange(h * w, device=x.device).view(1, 1, h, w)
    idx_c = None
    if cfg.max:
        mx = pooled[-1][:, :, None, None]
        idx_c = torch.where(xc == mx, hw_index, h * w).amin((2, 3))
    if not cfg.spatial:
        return (xc * dc).sum((2, 3)), dc, idx_c, None
    c_index = torch.arange(c, device=x.device).view(1, c, 1, 1)
    gs4 = gs.view(n, 1, h, w)
    y = (x * gc.to(x.dtype)[:, :, None, None]).to(cd)  # bit-identical to the forward's product
    d_gs = (dc * y).sum(1).view(n, h * w)
    smax = maps[:, 1:2]
    idx_s = torch.where(y == smax, c_index, c).amin(1, keepdim=True)
    sgrads = _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias)
    d_maps = sgrads[0].view(n, 2, h, w)
    d_savg, d_smax = d_maps[:, 0:1] / c, d_maps[:, 1:2]
    u = dc * gs4 + d_savg + torch.where(c_index == idx_s, d_smax, 0.0)
    d_gc = (xc * u).sum((2, 3))
    return d_gc, u, idx_c, (None, None, *sgrads[1:])


def _dx_traced(x, gc, u, d_avg, d_max, idx_c):
    n, c, h, w = x.shape
    dx = gc[:, :, None, None] * u
    if d_avg is not None:
        dx = dx + d_avg[:, :, None, None]
    if d_max is not None:
        hw_index = torch.arange(h * w, device=x.device).view(1, 1, h, w)
        dx = dx + torch.where(hw_index == idx_c[:, :, None, None], d_max[:, :, None, None], 0.0)
    return dx.to(x.dtype)
