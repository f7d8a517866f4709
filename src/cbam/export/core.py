"""Export a network to ONNX, TorchScript or a ``torch.export`` program, check the written artifact, then write it.

Every format has a dynamic batch and a dynamic image size (H and W each), and every export is checked before anything
is written: the serialised artifact is loaded back (ONNX by ONNX Runtime, TorchScript by ``torch.jit.load``, the
program by ``torch.export.load``) and its outputs are compared with the eager model's at several batch sizes and two
image sizes. A mismatch larger than the tolerance, an input the artifact refuses, a dimension the export fixed or a
graph that calls the fused CPU kernels' custom operators raises ``ValueError`` and leaves the destination untouched.

Why these exporters (PyTorch 2.14):

* ONNX: the dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, the default since 2.9). It builds the
  graph with ``torch.export``, so its dynamic dimensions are symbolic shapes checked while tracing, not axes renamed
  after a fixed-size trace; it lowers CBAM's pools and the classifier's mean to ``ReduceMean`` / ``ReduceMax`` and
  folds BatchNorm into the convolutions. The TorchScript-based exporter is deprecated and warns that it will be
  removed; it also emits ``GlobalAveragePool`` for an adaptive pool. Opset 18 is the lowest the dynamo exporter
  writes reliably: asked for 17 it tries a down-conversion that fails on the reductions and keeps 18 (so 18 is the
  minimum accepted here).
* TorchScript: ``torch.jit.trace`` (deprecated in 2.14 but still the way to make a TorchScript file). The modules'
  input checks are Python that scripting cannot compile; tracing records the operators of one call, so the check
  at a second batch and image size is what shows that the graph does not depend on the example's shape.
* Exported program: ``torch.export.export`` with ``Dim.AUTO`` batch, height and width (a dimension the model's
  code fixes is refused), saved with ``torch.export.save``. PyTorch adds guards where its shape reasoning needs
  them: a ResNet's program refuses inputs whose last feature map would be 1 pixel high or wide (H or W <= 32 for
  the ImageNet networks); the check reports such a refusal with the guard's text.

While tracing or exporting, CBAM modules and the fused blocks of :func:`cbam.fuse` compute their reference path
(``cbam.layers.dispatch.exporting``), so exported graphs hold standard operators only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..train.checkpoint import atomic_write

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "EXAMPLE_BATCH",
    "FORMATS",
    "ExportReport",
    "default_check_size",
    "export_model",
    "load_runner",
    "operators",
]

FORMATS = ("onnx", "torchscript", "exported-program")
DEFAULT_BATCH_SIZES = (1, 2, 3)
DEFAULT_TOLERANCE = 1e-4
DEFAULT_OPSET = 18
MIN_OPSET = 18
EXAMPLE_BATCH = 2  # the traced example's batch: a dimension traced at size 1 would be fixed to 1
INPUT_NAME = "images"
CUSTOM_OP_NAMESPACE = "cbam_cpu"  # the fused CPU kernels' operators: no other runtime knows them
_DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}

Runner = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class ExportReport:
    """What was written and what was checked."""

    format: str
    path: Path
    bytes: int
    batch_sizes: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...]
    max_abs_error: float
    tolerance: float
    operators: tuple[str, ...]
    opset: int | None = None

    def summary(self) -> str:
        """One line: the file, its size, the comparison's sizes and its largest error."""
        against = "ONNX Runtime" if self.format == "onnx" else "the reloaded file"
        opset = f", opset {self.opset}" if self.opset is not None else ""
        sizes = " and ".join(f"{h}x{w}" for h, w in self.image_sizes)
        batches = ", ".join(map(str, self.batch_sizes))
        return (
            f"wrote {self.path} ({self.format}{opset}, {self.bytes / 1e6:.1f} MB): {against} matches the model at "
            f"batch {batches} x {sizes} pixels, max |difference| {self.max_abs_error:.2e} <= {self.tolerance:g}"
        )


def default_check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The second image size checked: about 3/4 of the export's, odd and not square (169 x 171 for 224 x 224), so
    that no shape of the example can hide in the graph."""
    h, w = image_size
    return (max(1, h * 3 // 4) | 1, max(1, w * 3 // 4 + 2) | 1)


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str,
    *,
    image_size: tuple[int, int] = (224, 224),
    check_size: tuple[int, int] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    in_chans: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` (in eval mode; its mode is restored) to ``path`` in ``format``, traced at ``image_size``
    (H, W) with batch and image size dynamic, after checking the serialised artifact against the model at every
    batch size of ``batch_sizes`` and both ``image_size`` and ``check_size`` (max absolute difference <=
    ``tolerance``). ``path`` is written atomically, and only after the check passed."""
    fmt = _check_format(format)
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_model: expected an nn.Module, got {type(model).__name__}")
    image_size = _check_size("image_size", image_size)
    check_size = default_check_size(image_size) if check_size is None else _check_size("check_size", check_size)
    batches = _check_batch_sizes(batch_sizes)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"export_model: tolerance must be a finite number >= 0, got {tolerance!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"export_model: opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"export_model: {path} is a directory; expected a file path to write")
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"export_model: expected a model on the CPU, got tensors on {', '.join(sorted(devices))}")
    channels = _input_channels(model) if in_chans is None else in_chans
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(EXAMPLE_BATCH, channels, *image_size, generator=generator)

    modes = [(m, m.training) for m in model.modules()]  # each module's own mode comes back, frozen parts included
    model.eval()
    try:
        with torch.no_grad():
            with _exporter_errors(fmt):
                data, opset_written = _EXPORTERS[fmt](model, example, opset)
                runner, ops = load_runner(fmt, data)
            _check_no_custom_ops(fmt, ops)
            error = _compare(fmt, model, runner, (image_size, check_size), batches, channels, tolerance, generator)
    finally:
        for module, training in modes:
            module.training = training
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as exc:
        raise ValueError(f"export_model: cannot write {path}: {exc.strerror or exc}") from None
    return ExportReport(fmt, path, len(data), batches, (image_size, check_size), error, float(tolerance),
                        tuple(sorted(ops)), opset_written)


# ----------------------------------------------------------------------------------------------------------------------
# The three exporters: model and example in, serialised bytes out
# ----------------------------------------------------------------------------------------------------------------------
def _dynamic_shapes() -> tuple[dict[int, object], ...]:
    """Batch, height and width dynamic, for the model's single input (named positionally, whatever its name).

    ``Dim.AUTO``: where the model's code fixes a dimension, the export keeps it fixed instead of failing deep inside
    torch.export, and the exporters below name it in one line."""
    return ({axis: torch.export.Dim.AUTO for axis in _DYNAMIC_AXES},)


@contextlib.contextmanager
def _exporter_errors(fmt: str) -> Iterator[None]:
    """An exporter's own failure (an operator it cannot convert, a constraint it cannot meet) as one ValueError line."""
    try:
        yield
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # torch's exporters raise many types (UserError, RuntimeError, TorchExportError...)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = (lines[0] if lines else type(exc).__name__)[:300]
        raise ValueError(f"{fmt} export: {type(exc).__name__}: {reason}") from exc


def _require_onnx() -> None:
    """The ONNX format needs the optional packages onnx, onnxscript (the exporter) and onnxruntime (the check)."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"the onnx format needs {', '.join(missing)}, not installed here; "
                         "install them with: pip install 'cbam[onnx]'")


def _to_onnx(model: nn.Module, example: torch.Tensor, opset: int) -> tuple[bytes, int]:
    _require_onnx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own fallbacks; the check below is what counts
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(),
            opset_version=opset,
            input_names=[INPUT_NAME],
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ValueError(f"onnx export: asked for opset {opset}, the exporter wrote opset {written}")
    _name_dynamic_dims(proto)
    return proto.SerializeToString(), opset


def _name_dynamic_dims(proto) -> None:
    """Give the input's symbolic dimensions readable names (batch, height, width) everywhere they appear, and refuse a
    dimension the export fixed to the example's value."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names: dict[str, str] = {}
    for axis, name in _DYNAMIC_AXES.items():
        if not dims[axis].dim_param:
            raise ValueError(f"onnx export: the {name} is fixed to {dims[axis].dim_value} in the graph; the model's "
                             "code depends on it, so the export cannot take other sizes")
        names[dims[axis].dim_param] = name
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def _to_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> tuple[bytes, None]:
    del opset
    with warnings.catch_warnings():
        # jit.trace's deprecation notice, and TracerWarnings from the modules' input checks (the channel count they
        # compare is fixed by the weights, so baking it into the graph is right); the check below covers the rest
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    buffer = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(traced, buffer)
    return buffer.getvalue(), None


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Without torch.jit's notice that it is deprecated (the TorchScript format is what was asked for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        yield


def _to_exported_program(model: nn.Module, example: torch.Tensor, opset: int) -> tuple[bytes, None]:
    del opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())
    placeholder = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == placeholder)
    shape = node.meta["val"].shape
    for axis, name in _DYNAMIC_AXES.items():
        if not isinstance(shape[axis], torch.SymInt):
            raise ValueError(f"exported-program export: the {name} is fixed to {shape[axis]}; the model's code "
                             "depends on it, so the program cannot take other sizes")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue(), None


_EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, int], tuple[bytes, int | None]]] = {
    "onnx": _to_onnx,
    "torchscript": _to_torchscript,
    "exported-program": _to_exported_program,
}


# ----------------------------------------------------------------------------------------------------------------------
# Loading an artifact back, and what is in its graph
# ----------------------------------------------------------------------------------------------------------------------
def load_runner(format: str, data: bytes) -> tuple[Runner, set[str]]:
    """``(run, operators)`` for serialised ``data`` of ``format`` (bytes this process wrote or trusts): ``run(x)``
    returns the artifact's outputs as CPU tensors; ``operators`` names the operators of its graph
    (``"Conv"``/``"ReduceMean"`` for ONNX, ``"aten::conv2d"`` for the other two)."""
    fmt = _check_format(format)
    if fmt == "onnx":
        _require_onnx()
        return _onnx_runner(data)
    if fmt == "torchscript":
        with _quiet_jit():
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        ops = {node.kind() for node in module.inlined_graph.nodes()}
        return (lambda x: _as_list(module(x))), ops
    program = torch.export.load(io.BytesIO(data))
    module = program.module()
    return (lambda x: _as_list(module(x))), _program_ops(program)


def operators(format: str, path: str | Path) -> set[str]:
    """The operators of the graph in the artifact at ``path`` (see :func:`load_runner`)."""
    return load_runner(format, Path(path).read_bytes())[1]


def _onnx_runner(data: bytes) -> tuple[Runner, set[str]]:
    # imported here: onnx and onnxruntime are needed for this format only, and are not imports of this package
    import onnx
    import onnxruntime

    proto = onnx.load_from_string(data)
    ops = {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node}
    for function in proto.functions:
        ops |= {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in function.node}
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(out)) for out in session.run(None, {name: x.numpy()})]

    return run, ops


def _program_ops(program) -> set[str]:
    ops = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        ops.add(schema.name if schema is not None else getattr(node.target, "__name__", str(node.target)))
    return ops


def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _as_list(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _as_list(o)]
    raise TypeError(f"export: expected the model to return tensors, got {type(out).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------
def _check_no_custom_ops(fmt: str, ops: set[str]) -> None:
    custom = sorted(op for op in ops if CUSTOM_OP_NAMESPACE in op)
    if custom:
        raise ValueError(f"{fmt} export: the graph calls the fused CPU kernels ({', '.join(custom)}), which no other "
                         "runtime has; expected standard operators only")


def _compare(
    fmt: str,
    model: nn.Module,
    runner: Runner,
    sizes: tuple[tuple[int, int], ...],
    batches: tuple[int, ...],
    channels: int,
    tolerance: float,
    generator: torch.Generator,
) -> float:
    """The largest absolute difference between the artifact's and the model's outputs over every batch and size."""
    worst = 0.0
    for h, w in sizes:
        for n in batches:
            x = torch.randn(n, channels, h, w, generator=generator)
            where = f"batch {n}, {h}x{w} pixels"
            expected = _as_list(model(x))
            try:
                got = runner(x.clone())
            except Exception as exc:  # the runtime refuses the input: one line saying where and why
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise ValueError(f"{fmt} export: the exported file fails at {where}: {reason}") from None
            if [g.shape for g in got] != [e.shape for e in expected]:
                raise ValueError(f"{fmt} export: output shapes {[tuple(g.shape) for g in got]} differ from the "
                                 f"model's {[tuple(e.shape) for e in expected]} at {where}")
            pairs = zip(got, expected, strict=True)
            errors = [float((g.float() - e.float()).abs().max()) for g, e in pairs if e.numel()]
            error = next((e for e in errors if not e <= tolerance), max(errors, default=0.0))  # nan counts as too large
            if not error <= tolerance:
                raise ValueError(f"{fmt} export: the exported file differs from the model by up to {error:.3g} at "
                                 f"{where}; expected at most {tolerance:g}")
            worst = max(worst, error)
    return worst


def _check_format(fmt: object) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt  # type: ignore[return-value]


def _check_size(name: str, size: object) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise ValueError(f"export_model: {name} must be (H, W) with positive integers, got {size!r}")
    return (int(size[0]), int(size[1]))


def _check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    values = tuple(batch_sizes) if isinstance(batch_sizes, (tuple, list)) else ()
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in values):
        raise ValueError(f"export_model: batch_sizes must be positive integers (at least one), got {batch_sizes!r}")
    return values


def _input_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("export_model: the model has no nn.Conv2d to read its input channels from; pass in_chans")
    return first.in_channels
