"""Deterministic training: the ATen operators PyTorch 2.14 computes nondeterministically on CUDA, and a recorder that
lists which of them a training step calls.

The list (:data:`NONDETERMINISTIC`) is the docstring of ``torch.use_deterministic_algorithms`` in PyTorch 2.14
translated into the ATen operators that autograd dispatches (what a ``TorchDispatchMode`` sees: ``nn.AdaptiveMaxPool2d``
is ``aten::adaptive_max_pool2d`` forward and ``aten::adaptive_max_pool2d_backward`` backward), each with the reason
and the source. Two kinds:

* ``"raises"``: no deterministic CUDA implementation exists. Under ``torch.use_deterministic_algorithms(True)`` the
  call raises ``RuntimeError``; without it the result varies from run to run (atomic additions in the kernel).
* ``"deterministic"``: nondeterministic by default (atomic ``scatter_add_`` / ``index_add_`` and the like), but the
  flag switches it to a deterministic kernel (slower).

cuDNN's convolutions are apart (:data:`CUDNN_CONVOLUTION`): which algorithm runs is cuDNN's choice, some of its
backward algorithms accumulate with atomics, and the flag (or ``torch.backends.cudnn.deterministic = True``) restricts
it to deterministic ones; ``torch.backends.cudnn.benchmark`` must also be off, since timing-based choice can pick
different algorithms in two runs. Every CNN calls them; :func:`deterministic` sets both.

Reviewed and kept off the list (:data:`REVIEWED_DETERMINISTIC`), with the evidence: ``aten::max_pool2d_with_indices_
backward`` (the ResNet stem's 3 x 3 max pool), which the issue named next to ``adaptive_max_pool2d``'s backward. Its
CUDA backward kernels (``DilatedMaxPool2d.cu``: ``max_pool_backward_nchw`` and ``max_pool_backward_nhwc``) gather:
one thread owns each input-gradient element and adds, in a fixed loop order, the output gradients of the windows
whose recorded argmax is that element; there is no atomic operation and no ``alertNotDeterministic`` call, and
the 2.14 binary (``libtorch_cuda.so``) holds no ``max_pool2d_with_indices_backward_cuda`` alert name, while it holds
those of ``max_pool3d_with_indices_backward_cuda`` (whose kernel scatters with ``gpuAtomicAddNoReturn``, on
PyTorch's list) and ``adaptive_max_pool2d_backward_cuda``. So it is deterministic, and listing it would flag every
ResNet for nothing.

:func:`record_step` runs one training step (forward, loss, backward, optionally the optimiser's step) under
:class:`OpRecorder` and returns every operator called and those on the list. A recording on the CPU predicts the
CUDA run: the operators autograd dispatches are the same on both devices (the device-specific kernels sit below
them). CBAM modules on the CPU compute through the fused kernels (``cbam_cpu::*`` operators, listed in
:attr:`StepRecord.other`); on CUDA they compute the reference path, which ``cbam.layers.reference_only()`` shows on
the CPU.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CUDNN_CONVOLUTION",
    "NONDETERMINISTIC",
    "REVIEWED_DETERMINISTIC",
    "Finding",
    "Nondeterministic",
    "OpRecorder",
    "StepRecord",
    "deterministic",
    "nondeterministic_ops",
    "record_step",
]

DOCSTRING = "torch.use_deterministic_algorithms docstring (PyTorch 2.14)"
Condition = Callable[[torch._ops.OpOverload, tuple, dict], bool]


@dataclass(frozen=True)
class Nondeterministic:
    """An ATen operator that is nondeterministic on some devices; ``when`` says for which calls (None: every call)."""

    op: str  # "aten::adaptive_max_pool2d_backward" (the overload packet: every overload and out= variant)
    api: str  # the public API that calls it
    with_flag: str  # "raises" (no deterministic implementation) or "deterministic" (the flag selects one)
    devices: tuple[str, ...]  # where it is nondeterministic
    reason: str  # why, and where that is stated
    when: str = ""  # the calls concerned, in words ("" for every call)
    applies: Condition | None = field(default=None, compare=False, repr=False)

    def matches(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
        """True if this call of ``func`` is one the entry concerns."""
        return self.applies is None or bool(self.applies(func, args, kwargs))


def _arg(func: torch._ops.OpOverload, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
    """The value of argument ``name`` of a call, positional or keyword, by the operator's schema."""
    if name in kwargs:
        return kwargs[name]
    for i, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            return args[i] if i < len(args) else default
    return default


def _accumulate(value: bool) -> Condition:
    return lambda f, a, k: bool(_arg(f, a, k, "accumulate", False)) == value


def _reduce_in(*modes: str) -> Condition:
    return lambda f, a, k: _arg(f, a, k, "reduce") in modes


def _floating_or_complex(f, a, k) -> bool:
    dtype = _arg(f, a, k, "dtype") or a[0].dtype
    return dtype.is_floating_point or dtype.is_complex


def _tensor_src(f, a, k) -> bool:
    return isinstance(_arg(f, a, k, "src"), torch.Tensor)


def _reduced(f, a, k) -> bool:
    return _arg(f, a, k, "reduction", 1) != 0  # 0: Reduction::None


def _bag_max(f, a, k) -> bool:
    return _arg(f, a, k, "mode") == 2  # EmbeddingBag mode "max"


_ATOMIC = "atomic additions in the CUDA kernel"
_RAISES_DOC = f"{DOCSTRING}: throws when mode=True"
_FLAG_DOC = f"{DOCSTRING}: deterministic when mode=True"


def _raises(op: str, api: str, reason: str = _ATOMIC, when: str = "", applies: Condition | None = None,
            devices: tuple[str, ...] = ("cuda",)) -> Nondeterministic:
    return Nondeterministic(op, api, "raises", devices, f"{reason}; {_RAISES_DOC}", when, applies)


def _flag(op: str, api: str, reason: str = _ATOMIC, when: str = "", applies: Condition | None = None,
          devices: tuple[str, ...] = ("cuda",)) -> Nondeterministic:
    return Nondeterministic(op, api, "deterministic", devices, f"{reason}; {_FLAG_DOC}", when, applies)


_BILINEAR = "F.interpolate (linear, bilinear, bicubic, trilinear), backward"
NONDETERMINISTIC: tuple[Nondeterministic, ...] = (
    # ---- no deterministic implementation: RuntimeError under the flag
    _raises("aten::avg_pool3d_backward", "nn.AvgPool3d, backward"),
    _raises("aten::_adaptive_avg_pool2d_backward",
            "nn.AdaptiveAvgPool2d with an output other than 1 x 1 (PyTorch computes 1 x 1 as a mean), backward"),
    _raises("aten::_adaptive_avg_pool3d_backward", "nn.AdaptiveAvgPool3d, backward"),
    _raises("aten::adaptive_avg_pool3d_backward", "nn.AdaptiveAvgPool3d, backward (out= form)"),
    _raises("aten::adaptive_max_pool2d_backward", "nn.AdaptiveMaxPool2d, backward"),
    Nondeterministic("aten::adaptive_max_pool3d_backward", "nn.AdaptiveMaxPool3d, backward", "raises", ("cuda",),
                     f"{_ATOMIC}; not in the docstring, but the kernel calls alertNotDeterministic("
                     "'adaptive_max_pool3d_backward_cuda') (the name is in PyTorch 2.14's libtorch_cuda.so)"),
    _raises("aten::fractional_max_pool2d_backward", "nn.FractionalMaxPool2d, backward"),
    _raises("aten::fractional_max_pool3d_backward", "nn.FractionalMaxPool3d, backward"),
    _raises("aten::max_unpool2d", "nn.MaxUnpool1d / nn.MaxUnpool2d", "overlapping writes for repeated indices",
            devices=("cpu", "cuda")),
    _raises("aten::max_unpool3d", "nn.MaxUnpool3d", "overlapping writes for repeated indices", devices=("cpu", "cuda")),
    _raises("aten::upsample_linear1d_backward", _BILINEAR),
    _raises("aten::upsample_bilinear2d_backward", _BILINEAR),
    _raises("aten::_upsample_bilinear2d_aa_backward", _BILINEAR + " (antialias)"),
    _raises("aten::upsample_bicubic2d_backward", _BILINEAR),
    _raises("aten::_upsample_bicubic2d_aa_backward", _BILINEAR + " (antialias)"),
    _raises("aten::upsample_trilinear3d_backward", _BILINEAR),
    _raises("aten::reflection_pad1d_backward", "nn.ReflectionPad1d, backward"),
    _raises("aten::reflection_pad2d_backward", "nn.ReflectionPad2d, backward"),
    _raises("aten::reflection_pad3d_backward", "nn.ReflectionPad3d, backward"),
    _raises("aten::nll_loss2d_forward", "nn.NLLLoss / nn.CrossEntropyLoss on (N, C, H, W) scores",
            "atomic additions in the 'sum' / 'mean' reduction (PyTorch alerts in nll_loss2d_forward_out_cuda_template "
            "only; the (N, C) classification loss, aten::nll_loss_forward, reduces in one block and has no alert)",
            when="reduction 'mean' or 'sum'", applies=_reduced),
    _raises("aten::_ctc_loss_backward", "nn.CTCLoss, backward"),
    _raises("aten::_embedding_bag_backward", "nn.EmbeddingBag(mode='max'), backward", when="mode 'max'",
            applies=_bag_max),
    _raises("aten::_embedding_bag_dense_backward", "nn.EmbeddingBag(mode='max'), backward", when="mode 'max'",
            applies=_bag_max),
    _raises("aten::put_", "Tensor.put_(accumulate=False)", "the last of repeated indices' writes wins at random",
            when="accumulate=False", applies=_accumulate(False), devices=("cpu", "cuda")),
    _raises("aten::put", "torch.put(accumulate=False)", "the last of repeated indices' writes wins at random",
            when="accumulate=False", applies=_accumulate(False), devices=("cpu", "cuda")),
    _raises("aten::put_", "Tensor.put_(accumulate=True) on CUDA", when="accumulate=True", applies=_accumulate(True)),
    _raises("aten::put", "torch.put(accumulate=True) on CUDA", when="accumulate=True", applies=_accumulate(True)),
    _raises("aten::histc", "torch.histc"),
    _raises("aten::bincount", "torch.bincount with weights", when="weights given",
            applies=lambda f, a, k: _arg(f, a, k, "weights") is not None),
    _raises("aten::median", "torch.median with indices", when="the dim= form (values and indices)",
            applies=lambda f, a, k: "dim" in f._overloadname),
    _raises("aten::grid_sampler_2d_backward", "F.grid_sample (4-D), backward"),
    _raises("aten::grid_sampler_3d_backward", "F.grid_sample (5-D), backward"),
    _raises("aten::scatter_reduce", "Tensor.scatter_reduce(reduce='prod')", when="reduce='prod'",
            applies=_reduce_in("prod")),
    _raises("aten::scatter_reduce_", "Tensor.scatter_reduce_(reduce='prod')", when="reduce='prod'",
            applies=_reduce_in("prod")),
    _raises("aten::resize_", "Tensor.resize_ of a quantized tensor", "uninitialised memory",
            when="quantized tensors", applies=lambda f, a, k: a[0].is_quantized, devices=("cpu", "cuda")),
    # ---- nondeterministic by default; the flag selects a deterministic kernel
    _flag("aten::replication_pad1d_backward", "nn.ReplicationPad1d, backward"),
    _flag("aten::replication_pad2d_backward", "nn.ReplicationPad2d, backward"),
    _flag("aten::replication_pad3d_backward", "nn.ReplicationPad3d, backward"),
    _flag("aten::bmm", "torch.bmm of a sparse and a dense tensor", when="sparse input",
          applies=lambda f, a, k: a[0].is_sparse),
    _flag("aten::cumsum", "torch.cumsum of floating-point or complex tensors", "parallel scan order",
          when="floating point or complex", applies=_floating_or_complex),
    _flag("aten::cumsum_", "Tensor.cumsum_ of floating-point or complex tensors", "parallel scan order",
          when="floating point or complex", applies=_floating_or_complex),
    _flag("aten::index_put", "Tensor.index_put(accumulate=False)",
          "the last of repeated indices' writes wins at random", when="accumulate=False", applies=_accumulate(False),
          devices=("cpu", "cuda")),
    _flag("aten::index_put_", "Tensor.index_put_(accumulate=False), tensor[index] = values",
          "the last of repeated indices' writes wins at random", when="accumulate=False", applies=_accumulate(False),
          devices=("cpu", "cuda")),
    _flag("aten::_index_put_impl_", "Tensor.index_put_(accumulate=False)",
          "the last of repeated indices' writes wins at random", when="accumulate=False", applies=_accumulate(False),
          devices=("cpu", "cuda")),
    _flag("aten::index_put", "Tensor.index_put(accumulate=True) on the CPU; backward of Tensor.__getitem__",
          "parallel accumulation on the CPU", when="accumulate=True, CPU tensors", applies=_accumulate(True),
          devices=("cpu",)),
    _flag("aten::index_put_", "Tensor.index_put_(accumulate=True) on the CPU", "parallel accumulation on the CPU",
          when="accumulate=True, CPU tensors", applies=_accumulate(True), devices=("cpu",)),
    _flag("aten::_index_put_impl_", "backward of Tensor.__getitem__ with a list of index tensors, on the CPU",
          "parallel accumulation on the CPU", when="accumulate=True, CPU tensors", applies=_accumulate(True),
          devices=("cpu",)),
    _flag("aten::put_", "Tensor.put_(accumulate=True) on the CPU", "parallel accumulation on the CPU",
          when="accumulate=True, CPU tensors", applies=_accumulate(True), devices=("cpu",)),
    _flag("aten::put", "torch.put(accumulate=True) on the CPU", "parallel accumulation on the CPU",
          when="accumulate=True, CPU tensors", applies=_accumulate(True), devices=("cpu",)),
    _flag("aten::scatter_add", "torch.scatter_add; backward of torch.gather"),
    _flag("aten::scatter_add_", "Tensor.scatter_add_; backward of torch.gather"),
    _flag("aten::gather", "torch.gather of a tensor that requires grad (its backward is a scatter_add)",
          when="input requires grad", applies=lambda f, a, k: a[0].requires_grad),
    _flag("aten::index_add", "torch.index_add; backward of index_select and repeat_interleave"),
    _flag("aten::index_add_", "Tensor.index_add_; backward of index_select and repeat_interleave"),
    _flag("aten::index_select_backward", "torch.index_select, backward"),
    _flag("aten::index_copy", "torch.index_copy", "the last of repeated indices' writes wins at random",
          devices=("cpu", "cuda")),
    _flag("aten::index_copy_", "Tensor.index_copy_", "the last of repeated indices' writes wins at random",
          devices=("cpu", "cuda")),
    _flag("aten::scatter", "torch.scatter with a src tensor", "the last of repeated indices' writes wins at random",
          when="src is a tensor", applies=_tensor_src),
    _flag("aten::scatter_", "Tensor.scatter_ with a src tensor", "the last of repeated indices' writes wins at random",
          when="src is a tensor", applies=_tensor_src),
    _flag("aten::scatter_reduce", "Tensor.scatter_reduce(reduce='sum' or 'mean')", when="reduce='sum' or 'mean'",
          applies=_reduce_in("sum", "mean")),
    _flag("aten::scatter_reduce_", "Tensor.scatter_reduce_(reduce='sum' or 'mean')", when="reduce='sum' or 'mean'",
          applies=_reduce_in("sum", "mean")),
    _flag("aten::max_pool3d_with_indices_backward", "nn.MaxPool3d, backward",
          "atomic additions (gpuAtomicAddNoReturn) in the CUDA kernel"),
    _flag("aten::embedding_dense_backward", "nn.Embedding, backward"),
    _flag("aten::embedding_backward", "nn.Embedding, backward"),
)

#: cuDNN's convolutions: deterministic under the flag (or ``cudnn.deterministic``) with ``cudnn.benchmark`` off.
CUDNN_CONVOLUTION = {
    "aten::convolution": "cuDNN may choose a nondeterministic algorithm; " + _FLAG_DOC + " (nn.Conv1d, nn.Conv2d, "
    "nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d); keep torch.backends.cudnn.benchmark off",
    "aten::convolution_backward": "cuDNN's backward-data and backward-filter algorithms may use atomics; " + _FLAG_DOC,
}

#: Operators checked and found deterministic on CUDA, kept off the list, with the evidence.
REVIEWED_DETERMINISTIC = {
    "aten::max_pool2d_with_indices_backward": (
        "nn.MaxPool2d, backward (the ResNet stem's 3 x 3 max pool). Not on PyTorch's list. Its CUDA kernels "
        "(aten/src/ATen/native/cuda/DilatedMaxPool2d.cu, max_pool_backward_nchw / max_pool_backward_nhwc) are "
        "gathers: each thread owns input-gradient elements and sums, in a fixed order, the output gradients of the "
        "windows whose argmax is that element; no atomics, no alertNotDeterministic; PyTorch 2.14's libtorch_cuda.so "
        "has no 'max_pool2d_with_indices_backward_cuda' alert name (it has max_pool3d's, whose kernel uses atomics)"
    ),
    "aten::nll_loss_forward": (
        "nn.CrossEntropyLoss / nn.NLLLoss on (N, C) scores. The docstring lists NLLLoss on CUDA; the alert sits in "
        "nll_loss2d_forward_out_cuda_template only (the (N, C, H, W) form, aten::nll_loss2d_forward, on the list); "
        "the (N, C) kernel reduces in one thread block, deterministically"
    ),
    "aten::nll_loss_backward": "each thread writes its own sample's gradient element; no accumulation",
    "aten::mean": (
        "nn.AdaptiveAvgPool2d(1) lowers to it (PyTorch's adaptive_avg_pool2d computes a 1 x 1 output as a mean), "
        "so the old classifier head was deterministic already; its backward is an expand and a division"
    ),
}

_BY_OP: dict[str, list[tuple[int, Nondeterministic]]] = {}
for _index, _entry in enumerate(NONDETERMINISTIC):
    _BY_OP.setdefault(_entry.op, []).append((_index, _entry))


def nondeterministic_ops(device: str = "cuda", with_flag: str | None = None) -> list[str]:
    """The operator names on the list for ``device`` ("cuda" or "cpu"), optionally of one kind ("raises" or
    "deterministic"), sorted."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"nondeterministic_ops: device must be 'cuda' or 'cpu', got {device!r}")
    if with_flag not in (None, "raises", "deterministic"):
        raise ValueError(f"nondeterministic_ops: with_flag must be None, 'raises' or 'deterministic', "
                         f"got {with_flag!r}")
    return sorted({e.op for e in NONDETERMINISTIC if device in e.devices and with_flag in (None, e.with_flag)})


# ----------------------------------------------------------------------------------------------------------------------
# The recorder
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """A listed operator a step called, how often, and the entry that lists it."""

    op: str
    calls: int
    entry: Nondeterministic


class OpRecorder(TorchDispatchMode):
    """Counts every operator dispatched inside it (forward and backward alike), and the calls that the list concerns
    for ``device`` (default "cuda": a CPU recording predicts a CUDA run)."""

    def __init__(self, device: str = "cuda") -> None:
        super().__init__()
        if device not in ("cuda", "cpu"):
            raise ValueError(f"OpRecorder: device must be 'cuda' or 'cpu', got {device!r}")
        self.device = device
        self.calls: Counter[str] = Counter()
        self.flagged: Counter[tuple[str, int]] = Counter()  # (op, index of the entry in NONDETERMINISTIC)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.calls[name] += 1
        for index, entry in _BY_OP.get(name, ()):
            if self.device in entry.devices and entry.matches(func, args, kwargs):
                self.flagged[(name, index)] += 1
        return func(*args, **kwargs)

    def findings(self) -> list[Finding]:
        """The listed operators called, in name order."""
        return [Finding(op, n, NONDETERMINISTIC[i]) for (op, i), n in sorted(self.flagged.items())]


@dataclass(frozen=True)
class StepRecord:
    """What one training step called."""

    calls: dict[str, int]  # every operator, by name ("aten::convolution_backward": 20)
    flagged: tuple[Finding, ...]  # those on the list (for the recorder's device)

    @property
    def raises(self) -> tuple[Finding, ...]:
        """The flagged operators that have no deterministic implementation (the flag makes them raise)."""
        return tuple(f for f in self.flagged if f.entry.with_flag == "raises")

    @property
    def cudnn(self) -> tuple[str, ...]:
        """The cuDNN convolutions called (deterministic with the flag and benchmark off)."""
        return tuple(op for op in sorted(self.calls) if op in CUDNN_CONVOLUTION)

    @property
    def reviewed(self) -> tuple[str, ...]:
        """Operators called that were reviewed and found deterministic (see :data:`REVIEWED_DETERMINISTIC`)."""
        return tuple(op for op in sorted(self.calls) if op in REVIEWED_DETERMINISTIC)

    @property
    def other(self) -> tuple[str, ...]:
        """Operators outside ATen (such as the fused CPU kernels' ``cbam_cpu::*``), which the list cannot judge."""
        return tuple(op for op in sorted(self.calls) if not op.startswith(("aten::", "prims::", "profiler::")))


def record_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    optimizer: torch.optim.Optimizer | None = None,
    device: str = "cuda",
) -> StepRecord:
    """Run one training step of ``model`` (train mode: forward, ``loss_fn(output, targets)``, backward, and
    ``optimizer.step()`` when given) under an :class:`OpRecorder`, and return what it called."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"record_step: expected an nn.Module, got {type(model).__name__}")
    recorder = OpRecorder(device)
    model.train()
    with recorder:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return StepRecord(dict(recorder.calls), tuple(recorder.findings()))


# ----------------------------------------------------------------------------------------------------------------------
# Training deterministically
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deterministic(seed: int | None = None) -> Iterator[None]:
    """Inside: ``torch.use_deterministic_algorithms(True)`` (a listed "raises" operator then raises instead of varying),
    cuDNN restricted to deterministic algorithms without benchmarking, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset
    (cuBLAS needs it for reproducible results on CUDA >= 10.2; set it before the process starts CUDA to be sure), and
    with ``seed``, Python's, NumPy's and torch's generators seeded. The previous settings come back on exit."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    had_cublas = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if not had_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
