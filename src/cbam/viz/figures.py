"""The pictures of ``cbam visualize``, drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot state).

Sizes are fixed, so a picture's pixel size follows from its number of panels: an image figure is
``panels * PANEL_INCHES[0] * DPI`` by ``PANEL_INCHES[1] * DPI`` pixels; the channel-gate figure is
``stages * CHANNEL_INCHES[0] * DPI`` by ``CHANNEL_INCHES[1] * DPI``. matplotlib is imported when a figure is drawn,
so that ``import cbam`` works without the ``viz`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..train.checkpoint import atomic_write

__all__ = ["CHANNEL_INCHES", "DPI", "PANEL_INCHES", "Panel", "channel_figure", "image_figure", "save_png",
           "to_display"]

DPI = 100
PANEL_INCHES = (2.4, 2.9)  # width, height of one panel of an image figure (title lines included)
CHANNEL_INCHES = (3.2, 5.6)  # width, height of one stage's column of the channel-gate figure
HEAT_ALPHA = 0.5
BOX_COLOUR = "lime"


@dataclass(frozen=True)
class Panel:
    """One panel of an image figure: the image with ``heat`` (H x W, any non-negative scale) over it, or alone."""

    title: str
    heat: np.ndarray | None = None


def to_display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised C x H x W image back to what the eye sees: H x W x 3 in [0, 1], or H x W for grey images
    (one channel; of other channel counts the first channel is shown in grey)."""
    c = image.shape[0]
    m = torch.as_tensor(list(mean) if len(mean) == c else [mean[0]] * c, dtype=torch.float32)[:, None, None]
    s = torch.as_tensor(list(std) if len(std) == c else [std[0]] * c, dtype=torch.float32)[:, None, None]
    pixels = (image.float().cpu() * s + m).clamp(0, 1)
    return pixels.permute(1, 2, 0).numpy() if c == 3 else pixels[0].numpy()


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _normalised(heat: np.ndarray) -> np.ndarray:
    lo, hi = float(heat.min()), float(heat.max())
    return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)


def image_figure(image: np.ndarray, panels: Sequence[Panel], *, title: str = "",
                 box: Sequence[float] | None = None) -> Any:
    """One row of panels over the same image (H x W x 3 or H x W in [0, 1]); each heat map is stretched to its own
    range for display (the panel's title should say the range), ``box`` (x0, y0, x1, y1, pixels, x1/y1 exclusive)
    outlined on every panel."""
    from matplotlib.patches import Rectangle

    fig = _new_figure(len(panels) * PANEL_INCHES[0], PANEL_INCHES[1])
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    grey = image.ndim == 2
    for ax, panel in zip(axes, panels, strict=True):
        ax.imshow(image, cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
        if panel.heat is not None:
            ax.imshow(_normalised(np.asarray(panel.heat, dtype=np.float32)), cmap="jet", alpha=HEAT_ALPHA,
                      vmin=0, vmax=1, interpolation="bilinear")
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR,
                                   linewidth=1.2))
        ax.set_title(panel.title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.74, wspace=0.08)
    return fig


def channel_figure(stages: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]], images: int) -> Any:
    """How selective the channel gates are, one column per stage: above, each module's mean gate per channel over
    the images, sorted, with a band of +-1 standard deviation across images; below, a histogram of every gate value
    of the stage. ``stages``: (stage name, [(module path, N x C gates), ...])."""
    fig = _new_figure(max(1, len(stages)) * CHANNEL_INCHES[0], CHANNEL_INCHES[1])
    axes = fig.subplots(2, max(1, len(stages)), squeeze=False)
    for k, (name, modules) in enumerate(stages):
        top, bottom = axes[0, k], axes[1, k]
        values = []
        for path, gates in modules:
            gates = gates.float()
            mean, order = gates.mean(0).sort(descending=True)
            std = gates.std(0, unbiased=False)[order] if gates.shape[0] > 1 else torch.zeros_like(mean)
            rank = (np.arange(mean.numel()) + 0.5) / mean.numel()
            line = top.plot(rank, mean.numpy(), linewidth=1, label=path.rsplit(".", 1)[0] if "." in path else path)
            top.fill_between(rank, (mean - std).clamp(0, 1).numpy(), (mean + std).clamp(0, 1).numpy(),
                             color=line[0].get_color(), alpha=0.15, linewidth=0)
            values.append(gates.flatten())
        channels = sorted({int(g.shape[1]) for _, g in modules})
        top.set(ylim=(0, 1), xlim=(0, 1), xlabel="channel rank (by mean gate)", ylabel="channel gate")
        top.set_title(f"{name}: {len(modules)} module(s), {'/'.join(map(str, channels))} channels", fontsize=8)
        if len(modules) <= 6:
            top.legend(fontsize=6, loc="upper right")
        top.grid(alpha=0.3)
        every = torch.cat(values).numpy() if values else np.zeros(0)
        bottom.hist(every, bins=40, range=(0, 1), color="tab:blue")
        bottom.set(xlim=(0, 1), xlabel="channel gate", ylabel="count")
        spread = f"std {every.std():.3f}" if every.size else "no gates"
        bottom.set_title(f"all gates of {name} ({spread})", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
            ax.xaxis.label.set_size(7)
            ax.yaxis.label.set_size(7)
    if not stages:
        for ax in axes.flatten():
            ax.set_axis_off()
    fig.suptitle(f"channel gates over {images} image(s): mean per channel, sorted (band: +-1 std across images)",
                 fontsize=9)
    fig.subplots_adjust(left=0.12 / max(1, len(stages)) + 0.04, right=0.98, bottom=0.08, top=0.9,
                        wspace=0.35, hspace=0.45)
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at the fixed DPI, atomically (a temporary file renamed over ``path``)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
