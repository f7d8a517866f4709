"""The fused CBAM path on the CPU through hand-written kernels (``csrc/cbam_cpu.cpp``).

Composed of PyTorch operators, CBAM's full-size work costs many passes over memory, and Inductor's loops for the
reductions over channels of an NCHW map stride across all channels at once (measured: 2.2 copies' time for the pair
of pools that ideally cost half a copy). These kernels do each full-size pass once, at memory speed:

* forward: channel pools (sum, max, first arg-max over H x W), spatial pools of ``x * gc`` (sum, max, first arg-max
  over C, the product never stored), and ``out = (x * gc) * gs``: three reads and one write of the map;
* backward: ``d_gs = sum_c dout * x * gc`` with ``sum_hw dout * x * gs`` from the same read of ``dout`` and ``x``,
  ``sum_hw x * d_avg_map`` (one more read of ``x``), and ``dx`` (one read of ``dout``, one write);
* the 7 x 7 convolution of the two pooled maps and its backward as direct loops.

The small parts (MLP, BatchNorm of the spatial logits, sigmoids, the max pools' sparse gradient terms) stay
PyTorch operators. The kernels are compiled on first use with :func:`torch.utils.cpp_extension.load` (about 15 s
once; cached by PyTorch in ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``) and called as ``torch.ops``
operators, so ``torch.compile`` traces them without graph breaks. Without a C++ compiler, or with ``CBAM_NATIVE=0``
in the environment, the fused path composes PyTorch operators instead (``cbam_fused.py``); :func:`native_status`
says which is in use and why.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

from .cbam_fused import _channels_last, _compute_dtype, _mlp_backward, _spatial_backward, _spatial_forward

__all__ = ["native_available", "native_loaded", "native_status"]

_SOURCE = Path(__file__).with_name("csrc") / "cbam_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
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

                load("cbam_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS, is_python_module=False, verbose=False)
            except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back, say why
                reason = f"could not build the CPU kernels ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                print(f"cbam: {reason}; the fused path composes PyTorch operators instead", file=sys.stderr)
            else:
                _register_fakes()
                elapsed = time.perf_counter() - start
                if elapsed > 3:
                    print(f"cbam: compiled the fused CPU kernels in {elapsed:.0f} s (cached for later runs)",
                          file=sys.stderr)
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
    """Shapes of each operator's results, for torch.compile's tracing (no data)."""

    def fake(name):
        return torch.library.register_fake("cbam_cpu::" + name)

    def acc(x, *shape):
        return x.new_empty(shape, dtype=_compute_dtype(x))

    def channel_count(x, channels_last):
        return x.shape[2] if channels_last else x.shape[1]

    @fake("pools_and_channel_gate")
    def _(x, height, channels_last, w1, b1, w2, b2, avg, max, spatial):
        n, c = x.shape[0], channel_count(x, channels_last)
        p = x.shape[1] * x.shape[2] // c
        pools = int(avg) + int(max)
        maps = acc(x, n, 2, height, p // height) if spatial else acc(x, 0)
        idx_s = x.new_empty((n, p) if spatial else (0,), dtype=torch.int32)
        return (acc(x, pools, n, c), acc(x, pools, n, w1.shape[0]), acc(x, n, c), maps,
                x.new_empty((n, c), dtype=torch.int32), idx_s)

    fake("forward_inference")(lambda x, *args: torch.empty_like(x))
    fake("gate")(lambda x, chan, pos, channels_last, residual: torch.empty_like(x))
    fake("spatial_conv")(lambda maps, w, b: maps.new_empty((maps.shape[0], 1, maps.shape[2], maps.shape[3])))
    fake("spatial_conv_backward")(lambda d, maps, w: (torch.empty_like(maps), torch.empty_like(w)))
    fake("cross_sums")(lambda a, b, rowv, colv: (acc(a, a.shape[0], a.shape[1]), acc(a, a.shape[0], a.shape[2])))
    fake("weighted_sum")(lambda x, w, on_cols: acc(x, x.shape[0], x.shape[1] if on_cols else x.shape[2]))
    fake("input_grad")(lambda d, *args: torch.empty_like(d))


# --------------------------------------------------------------------------------------------------
# The computation. x3 is the map as a dense (N, R, K) view: (N, C, HW) for NCHW, (N, HW, C) for channels-last.
# --------------------------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor, cl: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c) if cl else x.reshape(n, c, h * w)


def _from_rows(t: torch.Tensor, shape: torch.Size, cl: bool) -> torch.Tensor:
    n, c, h, w = shape
    return t.view(n, h, w, c).permute(0, 3, 1, 2) if cl else t.view(n, c, h, w)


def _format(cl: bool) -> torch.memory_format:
    return torch.channels_last if cl else torch.contiguous_format


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as a dense (N, R, K) view and whether it is channels-last (other strides are copied to NCHW first)."""
    cl = _channels_last(x)
    if not (cl or x.is_contiguous()):
        x = x.contiguous()
    return _as_rows(x, cl), cl


def forward(x, residual, w1, b1, w2, b2, small, cfg, need_backward):
    """Same contract as ``cbam_fused._forward_eager`` (None for the saved tensors when one operator did all); with
    a residual, out is relu(cbam(x) + residual)."""
    ops = torch.ops.cbam_cpu
    wc, bc, gamma, beta, rmean, rvar = small
    wc = None if wc is None else wc.contiguous()  # a model moved to channels-last makes the 4-D weight so
    small = (wc, bc, gamma, beta, rmean, rvar)
    n, c, h, w = x.shape
    x3, cl = _dense(x)
    res3 = None if residual is None else _as_rows(residual.contiguous(memory_format=_format(cl)), cl)
    if not need_backward and cfg.bn != "batch":
        return _from_rows(_inference(x3, h, cl, w1, b1, w2, b2, small, cfg, res3), x.shape, cl), None
    pooled, hpre, gc, maps, idx_c, idx_s = ops.pools_and_channel_gate(
        x3, h, cl, w1, b1, w2, b2, cfg.avg, cfg.max, cfg.spatial
    )
    idx_c = idx_c if cfg.max else None
    if not cfg.spatial:
        out3 = ops.gate(x3, gc, gc.new_ones((n, h * w)), cl, res3)
        return _from_rows(out3, x.shape, cl), (gc, None, pooled, hpre, idx_c, None, None, None, None, None, None)
    gs, maps, zhat, rstd, mean, var = _spatial_forward(
        maps, wc, bc, gamma, beta, rmean, rvar, cfg, conv=ops.spatial_conv
    )
    out3 = ops.gate(x3, gc, gs, cl, res3)
    return _from_rows(out3, x.shape, cl), (gc, gs, pooled, hpre, idx_c, idx_s, maps, zhat, rstd, mean, var)


def _inference(x3, height, cl, w1, b1, w2, b2, small, cfg, res3):
    """The whole module in one operator, one sample at a time (no batch statistics, nothing kept for backward)."""
    wc, bc, gamma, beta, rmean, rvar = small
    one = w1.new_ones(1)
    scale, shift = one, one * 0
    if cfg.spatial and cfg.bn == "running":  # fold the BatchNorm into z * scale + shift
        scale = torch.rsqrt(rvar + cfg.eps) * (one if gamma is None else gamma)
        shift = (one * 0 if beta is None else beta) - rmean * scale
    return torch.ops.cbam_cpu.forward_inference(
        x3, height, cl, w1, b1, w2, b2, cfg.avg, cfg.max, wc if cfg.spatial else None, bc, scale, shift, res3
    )


def backward(dout, x, w1, w2, wc, gamma, saved, cfg, has_conv_bias):
    """Gradients (dx, dW1, db1, dW2, db2, d_conv_w, d_conv_b, d_gamma, d_beta) in the compute dtype (dx: x's)."""
    ops = torch.ops.cbam_cpu
    gc, gs, pooled, hpre, idx_c, idx_s, maps, zhat, rstd = saved
    wc = None if wc is None else wc.contiguous()
    n, c, h, w = x.shape
    hw = h * w
    x3, cl = _dense(x)
    d3 = _as_rows(dout.contiguous(memory_format=_format(cl)), cl)
    cd = gc.dtype
    sgrads = None
    if cfg.spatial:
        # one read of dout and x: d_gs (N, HW) and the direct term of d_gc (N, C)
        if cl:
            d_gs, d_gc = ops.cross_sums(d3, x3, gs, gc)
        else:
            d_gc, d_gs = ops.cross_sums(d3, x3, gc, gs)
        sgrads = _spatial_backward(
            d_gs, gs, maps, zhat, rstd, wc, gamma, cfg, has_conv_bias, conv_backward=ops.spatial_conv_backward
        )
        d_savg = sgrads[0] * (1.0 / c)
        d_smax = sgrads[1].contiguous()
        d_gc = d_gc + ops.weighted_sum(x3, d_savg, not cl)
        # the spatial max's term: each position's gradient goes to its first arg-max channel
        at_max = idx_s.long()
        x_at_max = x3.gather(2, at_max[:, :, None]).squeeze(2) if cl else x3.gather(1, at_max[:, None, :]).squeeze(1)
        d_gc.scatter_add_(1, at_max, x_at_max.to(cd) * d_smax)
    else:
        d_gc = (d3.to(cd) * x3.to(cd)).sum(1 if cl else 2)
        d_savg = gc.new_zeros((n, hw))
    d_logit = d_gc * gc * (1 - gc)
    d_pooled, dw1, db1, dw2, db2 = _mlp_backward(d_logit, pooled, hpre, w1, w2)
    d_avg = d_pooled[0] * (1.0 / hw) if cfg.avg else gc.new_zeros((n, c))
    # one pass writes dx, the max pools' gradients (each to its first arg-max element) included
    dx3 = ops.input_grad(
        d3,
        gs if cfg.spatial else gc.new_ones((n, hw)),
        d_savg,
        idx_s if cfg.spatial else None,
        d_smax if cfg.spatial else None,
        gc,
        d_avg,
        idx_c if cfg.max else None,
        d_pooled[-1] if cfg.max else None,
        cl,
    )
    d_wc, d_bc, d_gamma, d_beta = sgrads[2:] if sgrads is not None else (None,) * 4
    return [_from_rows(dx3, x.shape, cl), dw1, db1, dw2, db2, d_wc, d_bc, d_gamma, d_beta]
