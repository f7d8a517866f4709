"""The networks of the CBAM paper (Woo et al., ECCV 2018), by name, with or without attention.

``create_model("resnet50", attention="cbam")``; ``list_models("resnet*")``. Importing this package registers
the ResNet / WideResNet / ResNeXt (Table 4), MobileNet v1 (Table 5) and classic CIFAR ResNet builders.
"""

from . import cifar, mobilenet, resnet  # noqa: F401  (import registers the builders)
from ._registry import create_model, is_model, list_models, model_entrypoint, model_meta, register_model
from .complexity import count_macs, count_params, profile_model

__all__ = [
    "count_macs",
    "count_params",
    "create_model",
    "is_model",
    "list_models",
    "model_entrypoint",
    "model_meta",
    "profile_model",
    "register_model",
]
