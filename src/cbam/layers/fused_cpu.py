"""The fused CBAM path on the CPU through hand-written kernels (``csrc/cbam_cpu.cpp``).

Composed of PyTorch operators, CBAM's full-size work costs many passes over memory, and Inductor's loops for the
reductions over channels of an NCHW map stride across all channels at once (measured: 2.2 copies' time for the pair
of pools that ideally cost half a copy). These kernels do each full-size pass once, at memory speed:

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

With a BatchNorm in front of the module (a ResNet block's last one, folded by ``cbam_fused(..., norm=bn)``), the
kernels read the BatchNorm's input ``y`` and apply ``y * scale + shift`` as they go: its batch statistics take one
read of ``y`` (``channel_stats``), and its backward rides on the three backward passes (``affine_cross_sums``
gives the per-channel sums it needs; ``input_grad`` adds its batch-statistics term), see ``_backward_folded``.
At inference, the BatchNorm of a downsampling block's shortcut (``cbam_fused(..., residual_norm=bn)``) is folded
the same way into the output pass's read of the residual, so the block's shortcut is never normalised on its own.

The small parts (MLP backward, BatchNorm of the spatial logits, sigmoids) stay PyTorch operators. The kernels are
compiled on first use with :func:`torch.utils.cpp_extension.load` (about 30 s once; cached by PyTorch in
``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``, one build per instruction-set level) and called as
``torch.ops.cbam_cpu`` operators, so ``torch.compile`` traces them without graph breaks. Without a C++ compiler, or
with ``CBAM_NATIVE=0`` in the environment, the fused path composes PyTorch operators instead (``cbam_fused.py``);
:func:`native_status` says which is in use and why.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from .cbam_fused import _compute_dtype, _mlp_backward, _spatial_backward, _spatial_forward

__all__ = ["native_available", "native_loaded", "native_status"]

_SOURCE = Path(__file__).with_name("csrc") / "cbam_cpu.cpp"
# Instruction sets by the level PyTorch detected, not -march=native: a build cached in a home directory shared by
# machines of different generations must not use instructions another one lacks (each level is its own build).
_ISA_FLAGS = {
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mprefer-vector-width=512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}


def _build_flags() -> tuple[str, list[str]]:
    """The extension's name and compiler flags for this machine's instruction-set level."""
    level = torch.backends.cpu.get_cpu_capability().lower()
    isa = _ISA_FLAGS.get(level, []) if platform.machine() in ("x86_64", "AMD64") else []
    return f"cbam_cpu_{level if isa else 'generic'}", ["-O3", "-fopenmp", *isa]


_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "error": None}


def _disabled() -> str | None:
    value = os.environ.get("CBAM_NATIVE", "1").strip().lower()
    return "disabled by CBAM_NATIVE=0" if value in ("0", "false", "no", "off") else None


def _load() -> str | None:
    """Build (first time) and load the kernels; None on success, else why they are unavailable."""
    with _lock:
        if _state["tried"]:
            return _state["error"]  # type: ignore[return-value]
        _state["tried"] = True
        reason = _disabled()
        if reason is None:
            start = time.perf_counter()
            try:
                from torch.utils.cpp_extension import load

                name, flags = _build_flags()
                load(name, sources=[str(_SOURCE)], extra_cflags=flags, is_python_module=False, verbose=False)
            except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back, say why
                reason = f"could not build the CPU kernels ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                print(f"cbam: {reason}; the fused path composes PyTorch operators instead", file=sys.stderr)
            else:
                _register_fakes()
                elapsed = time.perf_counter() - start
                if elapsed > 3:
                    print(
                        f"cbam: compiled the fused CPU kernels in {elapsed:.0f} s (cached for later runs)",
                        file=sys.stderr,
                    )
        _state["error"] = reason
        return reason


def native_available() -> bool:
    """True when the hand-written CPU kernels are loaded (building them on first call)."""
    return _load() is None


def native_loaded() -> bool:
    """True when the kernels were loaded before (never builds: safe to call while torch.compile traces)."""
    return bool(_state["tried"]) and _state["error"] is None


def native_status() -> str:
    """'loaded', or why the fused path on the CPU composes PyTorch operators instead."""
    reason = _load()
    return "loaded" if reason is None else reason


def _register_fakes() -> None:
    """Shapes of each operator's results, for torch.compile's tracing (no data). Full-size outputs take the
    input's layout, as the kernels do."""

    def fake(name):
        return torch.library.register_fake("cbam_cpu::" + name)

    def acc(x, *shape):
        return x.new_empty(shape, dtype=_compute_dtype(x))

    @fake("pools_and_channel_gate")
    def _(x, w1, b1, w2, b2, avg, max, spatial, in_scale=None, in_shift=None, need_idx=True):
        n, c, h, w = x.shape
        pools = int(avg) + int(max)
        maps = acc(x, n, 2, h, w) if spatial else acc(x, 0)
        idx_s = x.new_empty((n, h * w) if spatial and need_idx else (0,), dtype=torch.int32)
        idx_c = x.new_empty((n, c) if need_idx else (0,), dtype=torch.int32)
        return (acc(x, pools, n, c), acc(x, pools, n, w1.shape[0]), acc(x, n, c), maps, idx_c, idx_s)

    fake("forward_inference")(lambda x, *args: torch.empty_like(x))
    fake("forward_inference_")(lambda x, *args: None)
    fake("gate")(lambda x, chan, pos, residual, in_scale=None, in_shift=None: torch.empty_like(x))
    fake("spatial_conv")(lambda maps, w, b: maps.new_empty((maps.shape[0], 1, maps.shape[2], maps.shape[3])))
    fake("spatial_conv_backward")(lambda d, maps, w: (torch.empty_like(maps), torch.empty_like(w)))
    fake("cross_sums")(lambda d, x, chan, pos: (acc(x, x.shape[0], x.shape[1]), acc(x, x.shape[0], pos.shape[1])))
    fake("affine_cross_sums")(
        lambda d, y, pos, ca, cb, center: (acc(y, y.shape[0], 3, y.shape[1]), acc(y, y.shape[0], pos.shape[1]))
    )
    fake("channel_stats")(lambda y: (acc(y, y.shape[1]), acc(y, y.shape[1])))
    fake("channel_weighted_sum")(lambda x, w, arg, mx, center=None: acc(x, x.shape[0], x.shape[1]))
    fake("input_grad")(lambda d, *args: torch.empty_like(d))


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
    """Same contract as ``cbam_fused._forward_eager`` (None for the saved tensors when one operator did all), plus
    the batch statistics of a folded BatchNorm in front (None without one); with a residual, out is
    relu(cbam(x) + residual). With cfg.pre, x is the input of that BatchNorm, which the kernels apply as they read.
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
    gs, maps, zhat, rstd, mean, var = _spatial_forward(
        maps, wc, bc, gamma, beta, rmean, rvar, cfg, conv=ops.spatial_conv
    )
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
    conv_backward = torch.ops.cbam_cpu.spatial_conv_backward
    sgrads = _spatial_backward(d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias, conv_backward=conv_backward)
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
