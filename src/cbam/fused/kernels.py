"""The fused CBAM computation on the CPU: the passes over full-size maps by the hand-written kernels
(``torch.ops.cbam_cpu``, see ``native.py``), the small parts (MLP, the spatial convolution's BatchNorm, sigmoids and
their backward) by PyTorch operators.

* forward: each thread takes its samples a bunch (about 2 MB) at a time, from the last one (the part of the map
  its producer wrote last, the likeliest still in the cache), and runs the bunch's passes back to back while it
  is in the cache: the channel pools (sum, max, first arg-max over H x W), the channel gates (the MLP's weights
  read once per bunch, by dot products in a fixed order, so a sample's result depends neither on its companions
  nor on the thread count) and the spatial pools of ``x * gc`` (sum, max, first arg-max over C, the product never
  stored); then the k x k convolution of the two maps; then ``out = (x * gc) * gs`` in one pass
  (``relu(out + residual)`` when the module ends a residual block). Without gradients and batch statistics, all
  of it is one operator, a bunch's output written right after its spatial pools;
* backward: ``sum_c dout * x * gc`` and ``sum_hw dout * x * gs`` from one read of ``dout`` and ``x``, the spatial
  maps' terms of the channel gate's gradient from one more read of ``x``, and ``dx`` written once (the max pools'
  gradients, each to its first arg-max element, inside that pass).

With a BatchNorm in front of the module (a residual block's last one, folded by the fused blocks), the kernels read
the BatchNorm's input ``y`` and apply ``y * scale + shift`` as they go: its batch statistics take one read of ``y``
(``channel_stats``), and its backward rides on the three backward passes (``affine_cross_sums`` gives the per-channel
sums it needs; ``input_grad`` adds its batch-statistics term), see ``_backward_folded``. At inference, the BatchNorm of
a downsampling block's shortcut is folded the same way into the output pass's read of the residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["backward", "forward"]


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


def _spatial_forward(maps, wc, bc, gamma, beta, rmean, rvar, cfg):
    """[avg; max] maps (N, 2, H, W) -> spatial gate gs (N, HW) and what its backward needs (N x HW or smaller)."""
    n, _, h, w = maps.shape
    z = torch.ops.cbam_cpu.spatial_conv(maps, wc, bc)
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
    d_maps, d_wc = torch.ops.cbam_cpu.spatial_conv_backward(d, maps, wc)
    d_bc = d.sum().view(1) if has_conv_bias else None
    return d_maps[:, 0].reshape(n, h * w), d_maps[:, 1].reshape(n, h * w), d_wc, d_bc, d_gamma, d_beta



# --------------------------------------------------------------------------------------------------
# The computation. The operators take (N, C, H, W) maps in either layout (NCHW or channels-last) and decide inside;
# nothing here looks at strides, so a compiled graph stays valid whatever layout Inductor gives the maps.
# --------------------------------------------------------------------------------------------------
def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when NCHW- or channels-last-contiguous (what the operators take), else an NCHW copy; the operators'
    registered output shapes and strides then match what they compute."""
    if t is None or t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _front_affine(y, front, cfg):
    """The folded BatchNorm in front as x = y * scale + shift (per channel), with what backward needs: (scale, shift,
    center, invstd) and the batch mean and unbiased variance (None with running statistics)."""
    pre_w, pre_b, pre_rm, pre_rv = front
    if cfg.pre == "batch":
        center, var = torch.ops.cbam_cpu.channel_stats(y)  # one read (torch.var_mean over N, H, W: many)
        invstd = torch.rsqrt(var + cfg.pre_eps)
        count = y.numel() // y.shape[1]
        stats = (center.detach(), (var * (count / (count - 1))).detach())
    else:
        center, invstd, stats = pre_rm, torch.rsqrt(pre_rv + cfg.pre_eps), None
    return (*_norm_affine(center, invstd, pre_w, pre_b), center, invstd), stats


def _norm_affine(center, invstd, weight, bias):
    """BatchNorm's (t - center) * invstd * weight + bias as t * scale + shift (weight and bias may be None)."""
    scale = invstd if weight is None else invstd * weight
    shift = -center * scale if bias is None else bias - center * scale
    return scale, shift


def _residual_affine(res_front):
    """The shortcut's BatchNorm (weight, bias, running mean, running variance, eps) as residual * scale + shift, as
    BatchNorm computes it at inference."""
    weight, bias, mean, var, eps = res_front
    return _norm_affine(mean, torch.rsqrt(var + eps), weight, bias)


def forward(x, residual, w1, b1, w2, b2, small, cfg, need_backward, front=None, res_front=None, inplace=False):
    """(out, the tensors backward needs (None when one operator did all), the batch statistics of a folded BatchNorm
    in front (None without one)); with a residual, out is relu(cbam(x) + residual). With cfg.pre, x is the input of
    that BatchNorm, which the kernels apply as they read.
    With ``res_front`` (the running statistics of a BatchNorm on the shortcut, see :func:`_residual_affine`; only
    where the single inference operator runs), the residual is that BatchNorm's input, normalised by the output pass
    as it reads. With ``inplace`` (the caller does not need x afterwards), the single inference operator writes its
    output into x."""
    ops = torch.ops.cbam_cpu
    wc, bc, gamma, beta, rmean, rvar = small
    wc = None if wc is None else wc.contiguous()  # a model moved to channels-last makes the 4-D weight so
    x, residual = _dense(x), _dense(residual)
    n, c, h, w = x.shape
    affine, pre_stats, front_saved = (None, None), None, ()
    one_operator = not need_backward and cfg.bn != "batch"
    if res_front is not None and not one_operator:
        raise RuntimeError("cbam_fused: a BatchNorm on the shortcut is folded only into the inference operator")
    if cfg.pre != "none":
        front_saved, pre_stats = _front_affine(x, front, cfg)
        affine = front_saved[:2]
    if one_operator:
        res_affine = (None, None) if res_front is None else _residual_affine(res_front)
        out = _inference(
            x, residual, w1, b1, w2, b2, wc, bc, gamma, beta, rmean, rvar, cfg, affine, res_affine, inplace
        )
        return out, None, pre_stats
    pooled, hpre, gc, maps, idx_c, idx_s = ops.pools_and_channel_gate(
        x, w1, b1, w2, b2, cfg.avg, cfg.max, cfg.spatial, *affine, need_idx=need_backward
    )
    idx_c = idx_c if cfg.max else None
    if not cfg.spatial:
        out = ops.gate(x, gc, gc.new_ones((n, h * w)), residual, *affine)
        return out, (gc, None, pooled, hpre, idx_c, None, None, None, None, None, None, *front_saved), pre_stats
    gs, maps, zhat, rstd, mean, var = _spatial_forward(maps, wc, bc, gamma, beta, rmean, rvar, cfg)
    out = ops.gate(x, gc, gs, residual, *affine)
    return out, (gc, gs, pooled, hpre, idx_c, idx_s, maps, zhat, rstd, mean, var, *front_saved), pre_stats


def _inference(
    x,
    residual,
    w1,
    b1,
    w2,
    b2,
    wc,
    bc,
    gamma,
    beta,
    rmean,
    rvar,
    cfg,
    affine=(None, None),
    res_affine=(None, None),
    inplace=False,
):
    """The whole module in one operator, sample by sample (no batch statistics, nothing kept); with ``inplace`` its
    output goes into x (the output pass then writes lines it has just read, which are in the cache)."""
    one = w1.new_ones(1)
    scale, shift = one, one * 0
    if cfg.spatial and cfg.bn == "running":  # fold the BatchNorm into z * scale + shift
        scale, shift = _norm_affine(rmean, torch.rsqrt(rvar + cfg.eps), gamma, beta)
    wc = wc if cfg.spatial else None
    args = (w1, b1, w2, b2, cfg.avg, cfg.max, wc, bc, scale, shift, residual, *affine, *res_affine)
    if inplace:
        torch.ops.cbam_cpu.forward_inference_(x, *args)
        return x
    return torch.ops.cbam_cpu.forward_inference(x, *args)


def backward(dout, x, w1, w2, wc, gamma, saved, cfg, has_conv_bias, pre_w=None):
    """Gradients (dx, dW1, db1, dW2, db2, d_conv_w, d_conv_b, d_gamma, d_beta) in the compute dtype (dx: x's), and
    with a folded BatchNorm in front, its (d_weight, d_bias) after them (dx is then its input's gradient)."""
    if cfg.pre != "none":
        return _backward_folded(dout, x, w1, w2, wc, gamma, saved, cfg, has_conv_bias, pre_w)
    ops = torch.ops.cbam_cpu
    gc, gs, pooled, hpre, idx_c, idx_s, maps, zhat, rstd = saved
    wc = None if wc is None else wc.contiguous()
    x, dout = _dense(x), _dense(dout)
    n, c, h, w = x.shape
    hw = h * w
    pos = gs if cfg.spatial else gc.new_ones((n, hw))
    # one read of dout and x: the direct term of d_gc (N, C) = sum_hw dout * x * gs, and d_gs (N, HW)
    d_gc, d_gs = ops.cross_sums(dout, x, gc, pos)
    sgrads, d_savg, d_smax = (None, gc.new_zeros((n, hw)), None)
    if cfg.spatial:
        sgrads, d_savg, d_smax = _spatial_terms(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias, c)
        # one more read of x: the two spatial maps' terms (the max map's at each position's arg-max channel)
        d_gc = d_gc + ops.channel_weighted_sum(x, d_savg, idx_s, d_smax)
    mlp_grads, d_avg, d_max = _gate_terms(d_gc, gc, pooled, hpre, w1, w2, cfg, hw)
    # one pass writes dx, the max pools' gradients (each to its first arg-max element) included
    dx = ops.input_grad(dout, pos, d_savg, idx_s if cfg.spatial else None, d_smax, gc, d_avg, idx_c, d_max)
    return [dx, *mlp_grads, *(sgrads[2:] if sgrads is not None else (None,) * 4)]


def _spatial_terms(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias, c):
    """The spatial gate's backward from d_gs: its parameters' gradients (in sgrads[2:]) and the two pooled maps'
    gradients as input_grad takes them (the average map's divided by C)."""
    sgrads = _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias)
    return sgrads, sgrads[0] * (1.0 / c), sgrads[1].contiguous()


def _gate_terms(d_gc, gc, pooled, hpre, w1, w2, cfg, hw):
    """The channel gate's backward from d_gc: the MLP's gradients (dW1, db1, dW2, db2) and the two pooled
    descriptors' gradients as input_grad takes them (the average pool's divided by H*W; None without a max pool)."""
    d_pooled, dw1, db1, dw2, db2 = _mlp_backward(d_gc * gc * (1 - gc), pooled, hpre, w1, w2)
    d_avg = d_pooled[0] * (1.0 / hw) if cfg.avg else torch.zeros_like(gc)
    return (dw1, db1, dw2, db2), d_avg, (d_pooled[-1] if cfg.max else None)


def _backward_folded(dout, y, w1, w2, wc, gamma, saved, cfg, has_conv_bias, pre_w):
    """backward() with a BatchNorm folded in front: x = y * scale + shift, never stored. Three passes as without it
    (the cross sums, the spatial maps' terms, dy written once); the BatchNorm's backward needs the per-channel sums of
    g = dL/dx and g * (y - center), which follow from per-(sample, channel) sums those passes make anyway:

        sum_p g      = gc * (sum_p dout * gs + sum_p map terms) + HW * d_avg + d_max
        sum_p g * z  = gc * (sum_p dout * gs * z + sum_p map terms * z) + d_avg * sum_p z + d_max * z[arg-max]

    so dy = scale * g + A + B * z (batch statistics: BatchNorm's mean and variance terms; running ones: A = B = 0)
    is written in the last pass."""
    ops = torch.ops.cbam_cpu
    gc, gs, pooled, hpre, idx_c, idx_s, maps, zhat, rstd, scale, shift, center, invstd = saved
    wc = None if wc is None else wc.contiguous()
    y, dout = _dense(y), _dense(dout)
    n, c, h, w = y.shape
    hw = h * w
    bias_at_center = shift + center * scale  # x = (y - center) * scale + bias_at_center
    pos = gs if cfg.spatial else gc.new_ones((n, hw))
    gc_scale = (gc * scale).contiguous()  # the channel gate times the BatchNorm's scale: x * gc = y * this + ...
    chan_sums, d_gs = ops.affine_cross_sums(dout, y, pos, gc_scale, (gc * shift).contiguous(), center)
    t_dz, t_d, t_z = chan_sums.unbind(1)  # sum_p dout*gs*z, sum_p dout*gs, sum_p z   (N, C) each
    d_gc = scale * t_dz + bias_at_center * t_d
    sgrads, d_savg, d_smax = (None, gc.new_zeros((n, hw)), None)
    map_sum = map_z = gc.new_zeros((n, c))
    if cfg.spatial:
        sgrads, d_savg, d_smax = _spatial_terms(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias, c)
        map_z = ops.channel_weighted_sum(y, d_savg, idx_s, d_smax, center)  # sum_p map terms * z
        map_sum = d_savg.sum(1, keepdim=True) + torch.zeros_like(gc).scatter_add_(1, idx_s.long(), d_smax)
        d_gc = d_gc + scale * map_z + bias_at_center * map_sum
    mlp_grads, d_avg, d_max = _gate_terms(d_gc, gc, pooled, hpre, w1, w2, cfg, hw)
    # the BatchNorm's sums over the batch and positions of g and g * z, per channel
    sum_g = gc * (t_d + map_sum) + d_avg * hw
    sum_gz = gc * (t_dz + map_z) + d_avg * t_z
    if d_max is not None:
        # y at each channel's arg-max position, through a (N, C, H*W) view of either layout
        planes = y.flatten(2) if y.is_contiguous() else y.permute(0, 2, 3, 1).reshape(n, hw, c).transpose(1, 2)
        at = planes.gather(2, idx_c.long().unsqueeze(-1)).squeeze(-1)
        sum_g = sum_g + d_max
        sum_gz = sum_gz + d_max * (at.to(gc.dtype) - center)
    sum_g, sum_gz = sum_g.sum(0), sum_gz.sum(0)
    d_pre_w = invstd * sum_gz if pre_w is not None else None
    d_pre_b = sum_g
    add = d_avg * scale
    y_terms = (None, None, None)
    if cfg.pre == "batch":
        count = n * hw
        add = add - scale * sum_g / count
        y_terms = (y, (-scale * invstd * invstd * sum_gz / count).contiguous(), center)
    d_max_scaled = None if d_max is None else (d_max * scale).contiguous()
    idx_s = idx_s if cfg.spatial else None
    dx = ops.input_grad(dout, pos, d_savg, idx_s, d_smax, gc_scale, add.contiguous(), idx_c, d_max_scaled, *y_terms)
    spatial_grads = sgrads[2:] if sgrads is not None else (None,) * 4
    return [dx, *mlp_grads, *spatial_grads, d_pre_w, d_pre_b]
