"""Checkpoints from elsewhere into this package's networks: detected, converted, checked, loaded strictly.

Formats (:data:`FORMATS`): this package's own files (``cbam``), the authors' release (``release``), timm's CBAM ResNet
(``timm``) and torchvision's plain ResNet (``torchvision``), for ResNet-18/34/50/101 (and 152, and the release's CIFAR
form). :func:`load_into` is what ``cbam.create_model(..., checkpoint=PATH)`` calls; :func:`convert_state_dict` works
without files; :func:`convert_checkpoint` is ``cbam convert``. Ultralytics' CBAM modules map to and from
``CBAM(preset="ultralytics")`` with :func:`ultralytics_to_cbam` / :func:`cbam_to_ultralytics`. See docs/convert.md.
"""

from .core import (
    CHECK_RTOL,
    ModelSpec,
    convert_checkpoint,
    convert_state_dict,
    fit_state_dict,
    infer_model,
    load_into,
    resnet_structure,
)
from .files import Checkpoint, read_checkpoint, state_dict_of
from .layouts import FORMATS, LAYOUT_NAMES, cbam_to_ultralytics, detect_layout, to_cbam_layout, ultralytics_to_cbam

__all__ = [
    "CHECK_RTOL",
    "FORMATS",
    "LAYOUT_NAMES",
    "Checkpoint",
    "ModelSpec",
    "cbam_to_ultralytics",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_layout",
    "fit_state_dict",
    "infer_model",
    "load_into",
    "read_checkpoint",
    "resnet_structure",
    "state_dict_of",
    "to_cbam_layout",
    "ultralytics_to_cbam",
]
