"""The ImageNet-1K results of the CBAM paper (Woo et al., ECCV 2018, Tables 4 and 5) as data.

Each row names the registered model and keyword arguments that rebuild the paper's network, so profiling
can be checked against the printed parameters and GFLOPs (``cbam.models.complexity``) and training runs
can be compared with the printed errors.

Counting convention: "GFLOPs" are multiply-accumulates of convs and linear layers at 224 x 224, batch 1.
The paper's ResNet-50/101 and ResNeXt-50/101 numbers are reproduced only with the stride of each
downsampling bottleneck on its first 1x1 conv ("v1"): ResNet-50 counts 3.858 GMACs that way and 4.089
with the stride on the 3x3 conv ("v1.5", torchvision and the authors' release); ResNeXt-50 3.768 vs 4.230.
Those rows therefore carry ``profile_kwargs={"stride_in_1x1": True}``: a counting convention, not the
network the authors' code trains (parameters do not depend on it). ResNet-18/34 and WideResNet18 use basic
blocks, whose stride is on the first conv either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .complexity import profile_model

__all__ = ["PAPER_ROWS", "PaperRow", "TABLE4", "TABLE5", "find_row"]

_V1 = {"stride_in_1x1": True}


@dataclass(frozen=True)
class PaperRow:
    """One row of CBAM Table 4 or 5: how to build the network and what the paper printed."""

    table: int
    label: str
    model: str
    attention: str | None
    params_m: float
    gflops: float
    top1_err: float
    top5_err: float
    kwargs: dict[str, Any] = field(default_factory=dict)  # architecture (e.g. widen, width_mult)
    profile_kwargs: dict[str, Any] = field(default_factory=dict)  # counting convention only

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model(self.model, **...)``: the architecture, as trained."""
        return {"attention": self.attention, **self.kwargs}

    def profile(self) -> dict[str, int]:
        """Measured ``{"params", "macs"}`` of the network in the paper's counting convention."""
        kwargs = {**self.kwargs, **self.profile_kwargs}
        return profile_model(self.model, attention=self.attention, input_size=224, **kwargs)


def _t4(
    label: str,
    model: str,
    results: tuple[tuple[float, float, float, float], ...],
    kwargs: dict[str, Any] | None = None,
    profile_kwargs: dict[str, Any] | None = None,
) -> list[PaperRow]:
    rows = []
    for attention, suffix, (params, gflops, top1, top5) in zip(
        (None, "se", "cbam"), ("", " + SE", " + CBAM"), results, strict=True
    ):
        rows.append(
            PaperRow(
                4,
                label + suffix,
                model,
                attention,
                params,
                gflops,
                top1,
                top5,
                kwargs=dict(kwargs or {}),
                profile_kwargs=dict(profile_kwargs or {}),
            )
        )
    return rows


# fmt: off
TABLE4: tuple[PaperRow, ...] = tuple(
    _t4("ResNet18", "resnet18",
        ((11.69, 1.814, 29.60, 10.55), (11.78, 1.814, 29.41, 10.22), (11.78, 1.815, 29.27, 10.09)))
    + _t4("ResNet34", "resnet34",
          ((21.80, 3.664, 26.69, 8.60), (21.96, 3.664, 26.13, 8.35), (21.96, 3.665, 25.99, 8.24)))
    + _t4("ResNet50", "resnet50",
          ((25.56, 3.858, 24.56, 7.50), (28.09, 3.860, 23.14, 6.70), (28.09, 3.864, 22.66, 6.31)),
          profile_kwargs=_V1)
    + _t4("ResNet101", "resnet101",
          ((44.55, 7.570, 23.38, 6.88), (49.33, 7.575, 22.35, 6.19), (49.33, 7.581, 21.51, 5.69)),
          profile_kwargs=_V1)
    + _t4("WideResNet18 (widen=1.5)", "wide_resnet18",
          ((25.88, 3.866, 26.85, 8.88), (26.07, 3.867, 26.21, 8.47), (26.08, 3.868, 26.10, 8.43)),
          kwargs={"widen": 1.5})
    + _t4("WideResNet18 (widen=2.0)", "wide_resnet18",
          ((45.62, 6.696, 25.63, 8.20), (45.97, 6.696, 24.93, 7.65), (45.97, 6.697, 24.84, 7.63)),
          kwargs={"widen": 2.0})
    + _t4("ResNeXt50 (32x4d)", "resnext50_32x4d",
          ((25.03, 3.768, 22.85, 6.48), (27.56, 3.771, 21.91, 6.04), (27.56, 3.774, 21.92, 5.91)),
          profile_kwargs=_V1)
    + _t4("ResNeXt101 (32x4d)", "resnext101_32x4d",
          ((44.18, 7.508, 21.54, 5.75), (48.96, 7.512, 21.17, 5.66), (48.96, 7.519, 21.07, 5.59)),
          profile_kwargs=_V1)
)

TABLE5: tuple[PaperRow, ...] = tuple(
    PaperRow(5, f"MobileNet alpha={alpha}{suffix}", "mobilenet_v1", attention, params, gflops, top1, top5,
             kwargs={"width_mult": alpha})
    for alpha, attention, suffix, params, gflops, top1, top5 in (
        (0.7, None, "", 2.30, 0.283, 34.86, 13.69),
        (0.7, "se", " + SE", 2.71, 0.283, 32.50, 12.49),
        (0.7, "cbam", " + CBAM", 2.71, 0.289, 31.51, 11.48),
        (1.0, None, "", 4.23, 0.569, 31.39, 11.51),
        (1.0, "se", " + SE", 5.07, 0.570, 29.97, 10.63),
        (1.0, "cbam", " + CBAM", 5.07, 0.576, 29.01, 9.99),
    )
)
# fmt: on

PAPER_ROWS: tuple[PaperRow, ...] = TABLE4 + TABLE5


def find_row(label: str) -> PaperRow:
    """The row with this label (case-insensitive), e.g. ``find_row("ResNet50 + CBAM")``."""
    for row in PAPER_ROWS:
        if row.label.lower() == label.lower():
            return row
    raise KeyError(f"no paper row {label!r}; rows: {', '.join(r.label for r in PAPER_ROWS)}")
