"""Where a CBAM module's computation runs, decided per call by the input's device, as a PyTorch operator dispatches.

``CBAM.forward`` looks up a kernel for its input's device type here; a kernel returns the module's output, or None
when it does not serve that call (dtype, configuration, a hook that must see the gates' own modules, ...), and the
module then computes its reference path. Nothing is registered by this package's ``layers``: the fused package
(``cbam.fused``) registers its CPU kernel when ``cbam`` is imported, and a GPU kernel will register for "cuda" the
same way once a GPU measurement shows it faster than the reference path there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["Kernel", "exporting", "kernel_for", "reference_only", "register_kernel", "registered_kernels"]

Kernel = Callable[[nn.Module, torch.Tensor], "torch.Tensor | None"]

_KERNELS: dict[str, Kernel] = {}
_REFERENCE_ONLY = [0]  # depth of reference_only() blocks: a mutable cell that torch.compile guards on


def register_kernel(device_type: str, kernel: Kernel) -> None:
    """Make ``kernel(module, x)`` compute CBAM modules for inputs on ``device_type`` ("cpu", "cuda", ...)."""
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f"register_kernel: expected a device type such as 'cpu', got {device_type!r}")
    if not callable(kernel):
        raise TypeError(f"register_kernel: expected a callable kernel(module, x), got {kernel!r}")
    _KERNELS[device_type] = kernel


def registered_kernels() -> dict[str, Kernel]:
    """Device type -> kernel, a copy."""
    return dict(_KERNELS)


def kernel_for(x: torch.Tensor) -> Kernel | None:
    """The kernel registered for x's device type, or None: always inside :func:`reference_only`, and while the model is
    traced or exported (:func:`exporting`), so that exported graphs hold standard operators only."""
    if _REFERENCE_ONLY[0] or exporting():
        return None
    return _KERNELS.get(x.device.type)


def exporting() -> bool:
    """True while ``torch.jit.trace``, ``torch.export`` or ``torch.onnx.export`` (either exporter) records the model.

    A traced or exported graph must hold standard operators only: the kernels' custom operators exist only in a process
    that built them, and no other runtime (ONNX Runtime, a C++ program loading TorchScript) knows them. Plain
    ``torch.compile`` is not exporting (``torch.compiler.is_compiling()`` alone is not checked): its graphs run in this
    process and keep the kernels."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Inside this block every CBAM module computes its reference path (to compare or benchmark the two)."""
    _REFERENCE_ONLY[0] += 1
    try:
        yield
    finally:
        _REFERENCE_ONLY[0] -= 1
