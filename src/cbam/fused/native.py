"""Building and loading the hand-written CPU kernels (``csrc/cbam_cpu.cpp``) as ``torch.ops.cbam_cpu`` operators.

The kernels are compiled on first need, never at import and never for a model that does not run on the CPU: the first
CPU call of a CBAM module (or :func:`load`) builds them with :func:`torch.utils.cpp_extension.load`, about 30 s once.

* One build per machine, torch and environment. The build folder's name carries a key made from the source, the
  compiler flags, the Python and torch versions and where torch is installed, so two virtual environments (or two torch
  versions) on one machine keep their own copy instead of rebuilding each other's. The folder sits in
  ``$CBAM_EXTENSIONS_DIR``, else ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``.
* One builder at a time. Processes that start together (torchrun's ranks) take an exclusive ``flock`` on the build
  folder: one builds, the others wait and then load its result. The operating system releases the lock when its holder
  dies, so a killed build never leaves the others waiting; the lock file torch's own builder leaves behind after a kill
  is removed under that lock.
* Without a compiler (or ninja), or with ``CBAM_NATIVE=0``, CBAM computes the reference path; one warning says why.

Once loaded, the operators get fake implementations (shapes for ``torch.compile``) and FLOP formulas
(``torch.utils.flop_counter``: the MLP's and the spatial convolution's multiply-adds, as the reference path's ``linear``
and ``conv2d`` count them), so tools see the true cost.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised across processes
    fcntl = None  # type: ignore[assignment]

__all__ = ["build_directory", "load", "loaded", "native_status", "ready"]

SOURCE = Path(__file__).with_name("csrc") / "cbam_cpu.cpp"

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

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "error": None}


def _flags() -> tuple[str, list[str]]:
    """The instruction-set level's name and the compiler flags for this machine."""
    level = torch.backends.cpu.get_cpu_capability().lower()
    isa = _ISA_FLAGS.get(level, []) if platform.machine() in ("x86_64", "AMD64") else []
    return (level if isa else "generic"), ["-O3", "-fopenmp", *isa]


def _extension_name() -> str:
    """``cbam_cpu_<level>_<key>``: the key changes with the source, the flags, Python, torch and its location."""
    level, flags = _flags()
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (*flags, sys.version, torch.__version__, str(Path(torch.__file__).resolve().parent)):
        digest.update(b"\0" + part.encode())
    return f"cbam_cpu_{level}_{digest.hexdigest()[:12]}"


def build_directory() -> Path:
    """The folder this environment's build of the kernels lives in."""
    base = os.environ.get("CBAM_EXTENSIONS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "torch_extensions"
    return root / _extension_name()


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold the build folder's lock: one process builds while the others wait; released if its holder dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "cbam.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # torch's own builder marks a build in progress with a file named 'lock' and waits while it exists; a
            # killed build leaves it behind. Under our lock no build of this folder is running, so it is stale.
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _disabled() -> str | None:
    value = os.environ.get("CBAM_NATIVE", "1").strip().lower()
    return "disabled by CBAM_NATIVE=0" if value in ("0", "false", "no", "off") else None


def _build_and_load() -> None:
    # Imported here, not at the top: it imports setuptools and looks for a CUDA toolkit, which a process that never
    # runs CBAM on the CPU should not pay for (or log about: the CPU build needs no CUDA).
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as cpp_load
    finally:
        cpp_logger.setLevel(level)

    directory = build_directory()
    _, flags = _flags()
    with exclusive(directory):
        cpp_load(
            directory.name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )


def load() -> str | None:
    """Build (the first time on this machine) and load the kernels; None on success, else why they are unavailable.

    Runs once per process; later calls return the first answer."""
    with _lock:
        if _state["tried"]:
            return _state["error"]  # type: ignore[return-value]
        _state["tried"] = True
        reason = _disabled()
        if reason is None:
            start = time.perf_counter()
            try:
                _build_and_load()
            except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back, say why
                reason = f"could not build the CPU kernels ({type(exc).__name__}: {str(exc).strip()[:300]})"
                reason = " ".join(reason.split())
                warnings.warn(f"cbam: {reason}; CBAM computes the reference path on the CPU", RuntimeWarning, 2)
            else:
                _register_fakes()
                _register_flop_formulas()
                elapsed = time.perf_counter() - start
                if elapsed > 3:
                    print(f"cbam: compiled the CPU kernels in {elapsed:.0f} s (cached for later runs)", file=sys.stderr)
        _state["error"] = reason
        return reason


def loaded() -> bool:
    """True when the kernels were loaded before (never builds)."""
    return bool(_state["tried"]) and _state["error"] is None


@torch.compiler.assume_constant_result
def ready() -> bool:
    """True when the kernels are loaded, building them on the first call. Under ``torch.compile`` the call runs once,
    while the graph is traced, and its answer is a constant of the graph (no graph break)."""
    return load() is None


def native_status() -> str:
    """'loaded', 'not built yet', or why CBAM computes the reference path on the CPU; never builds."""
    if not _state["tried"]:
        return "not built yet (built on the first CPU call of a CBAM module)"
    return "loaded" if _state["error"] is None else str(_state["error"])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the kernels' sums and small parts: float32 for half-precision maps, the map's own otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _register_fakes() -> None:
    """Shapes of each operator's results, for torch.compile's tracing (no data). Full-size outputs take the
    input's layout, as the kernels do."""

    def fake(name: str) -> Callable:
        return torch.library.register_fake("cbam_cpu::" + name)

    def acc(x, *shape):
        return x.new_empty(shape, dtype=compute_dtype(x))

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


# ----------------------------------------------------------------------------------------------------------------------
# FLOP formulas: what the reference path's linear and conv2d layers count (2 FLOPs a multiply-add), so FlopCounterMode
# over a network that runs the kernels counts what `cbam profile` counts. Pools, gates and BatchNorms count nothing,
# as their aten operators count nothing.
# ----------------------------------------------------------------------------------------------------------------------
def mlp_flops(x_shape, w1_shape, pools: int) -> int:
    """fc1 (C -> hidden) and fc2 (hidden -> C) applied to ``pools`` descriptors of every sample."""
    n, c = x_shape[0], x_shape[1]
    return 2 * pools * n * 2 * c * w1_shape[0]


def conv_flops(maps_shape, weight_shape) -> int:
    """The 'same' k x k convolution of the (N, 2, H, W) maps to one map."""
    n, _, h, w = maps_shape
    out_ch, in_ch, kh, kw = weight_shape
    return 2 * n * h * w * out_ch * in_ch * kh * kw


def _pools_flops(x, w1, b1, w2, b2, avg, max, *args, out_val=None, **kwargs) -> int:
    return mlp_flops(x.shape, w1.shape, int(avg) + int(max))


def _inference_flops(x, w1, b1, w2, b2, avg, max, conv_weight, *args, out_val=None, **kwargs) -> int:
    flops = mlp_flops(x.shape, w1.shape, int(avg) + int(max))
    if conv_weight is not None:
        n, _, h, w = x.shape
        flops += conv_flops((n, 2, h, w), conv_weight.shape)
    return flops


def _conv_flops(maps, weight, bias=None, *, out_val=None) -> int:
    return conv_flops(maps.shape, weight.shape)


def _conv_backward_flops(d, maps, weight, *, out_val=None) -> int:
    return 2 * conv_flops(maps.shape, weight.shape)  # the input's gradient and the weight's, as aten counts them


def _register_flop_formulas() -> None:
    # imported here, not at the top: it loads triton, which must not come after TensorFlow (docs/keras.md)
    from torch.utils import flop_counter

    ops = torch.ops.cbam_cpu
    formulas = {
        ops.pools_and_channel_gate: _pools_flops,
        ops.forward_inference: _inference_flops,
        ops.forward_inference_: _inference_flops,
        ops.spatial_conv: _conv_flops,
        ops.spatial_conv_backward: _conv_backward_flops,
    }
    for op, formula in formulas.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)
