"""Looking at what CBAM attends to: :func:`record` captures every CBAM module's gates during a forward pass;
:func:`visualize` draws them (with Grad-CAM) for a trained run and scores them against object boxes."""

from .recorder import Recording, record
from .score import ScoreRow, box_fractions, box_masks, mass_in_box, pointing_hits, upsample
from .visualize import Stage, attention_stages, grad_cam, gradcam_layer, visualize

__all__ = [
    "Recording",
    "ScoreRow",
    "Stage",
    "attention_stages",
    "box_fractions",
    "box_masks",
    "grad_cam",
    "gradcam_layer",
    "mass_in_box",
    "pointing_hits",
    "record",
    "upsample",
    "visualize",
]
