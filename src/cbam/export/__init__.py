"""Export a network with its weights to ONNX, TorchScript or a ``torch.export`` program, checked before it is written.

``cbam.export.export_model(model, "resnet50.onnx", "onnx")``; on the command line ``cbam export``. See
:mod:`cbam.export.core` for the formats, the choice of exporters and what the check compares, and ``docs/export.md``.
"""

from .core import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    FORMATS,
    ExportReport,
    default_check_size,
    export_model,
    load_runner,
    operators,
)

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "ExportReport",
    "default_check_size",
    "export_model",
    "load_runner",
    "operators",
]
