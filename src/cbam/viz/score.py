"""How well an attention map falls on the object: the pointing game and the share of the map's mass in its box.

Pure functions on tensors, so that the definitions can be checked on hand-built maps:

* a map (``N x h x w`` or ``N x 1 x h x w``, non-negative) is first upsampled to the image size, bilinearly with
  ``align_corners=False`` (:func:`upsample`);
* a box is ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive; pixel ``(i, j)`` (column ``i``, row ``j``)
  is inside when its centre ``(i + 0.5, j + 0.5)`` is, which for whole-pixel boxes is ``x0 <= i < x1`` and
  ``y0 <= j < y1`` (:func:`box_masks`);
* **pointing game** (:func:`pointing_hits`): a hit when the map's maximum is inside the box. Ties count against the
  map: every pixel within a tiny tolerance of the maximum must be inside, so a flat map is a miss unless the box
  covers the whole image, and an upsampled peak that straddles the box's edge is a miss;
* **mass in box** (:func:`mass_in_box`): the map's sum inside the box over its sum. A map that is zero everywhere is
  as uninformative as a flat one and gets what a flat map gets, the box's area fraction;
* **chance** (:func:`box_fractions`): the box's share of the image area, which is both what a uniform map gets for
  mass in box and the hit rate of a point drawn uniformly at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..report import format_rows

__all__ = [
    "SCORE_COLUMNS",
    "TIE_RTOL",
    "ScoreRow",
    "box_fractions",
    "box_masks",
    "mass_in_box",
    "pointing_hits",
    "score_rows_table",
    "summarise",
    "upsample",
]

TIE_RTOL = 1e-5  # pixels within this fraction of the maximum attain it (float noise of the bilinear upsampling)

SCORE_COLUMNS = ("map", "model", "pointing game %", "mass in box %", "chance %", "images")


def _maps3d(maps: torch.Tensor, what: str = "maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor N x h x w or N x 1 x h x w, got {type(maps).__name__}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"{what}: expected a tensor N x h x w or N x 1 x h x w, got shape {tuple(maps.shape)}")
    return maps.float()


def _boxes(boxes: torch.Tensor | Sequence[Sequence[float]], n: int) -> torch.Tensor:
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes: expected {n} x 4 (x0, y0, x1, y1) for {n} maps, got shape {tuple(boxes.shape)}")
    return boxes


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``maps`` (N x h x w or N x 1 x h x w) at the image size (N x H x W): bilinear, ``align_corners=False``, so
    that each map pixel stays centred on the image pixels it covers (a no-op at the same size)."""
    maps = _maps3d(maps)
    height, width = (size, size) if isinstance(size, int) else size
    if tuple(maps.shape[-2:]) == (height, width):
        return maps
    return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def box_masks(boxes: torch.Tensor | Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """N x H x W bool masks: pixel (i, j) is inside when its centre (i + 0.5, j + 0.5) lies in [x0, x1) x [y0, y1)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected N x 4 (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])  # N x W
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])  # N x H
    return inside_y[:, :, None] & inside_x[:, None, :]


def _checked(maps: torch.Tensor, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    maps = _maps3d(maps)
    if not torch.isfinite(maps).all():
        raise ValueError("maps: expected finite values, got NaN or infinity")
    if (maps < 0).any():
        raise ValueError(f"maps: expected non-negative values, got a minimum of {maps.min().item():g}")
    n, height, width = maps.shape
    return maps, box_masks(_boxes(boxes, n), height, width)


def pointing_hits(maps: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """N bools: whether every pixel attaining the map's maximum (within ``TIE_RTOL`` of it) is inside the box.

    Maps are scored at their own size: upsample them first (:func:`upsample`)."""
    maps, inside = _checked(maps, boxes)
    flat = maps.flatten(1)
    top = flat.max(dim=1, keepdim=True).values
    attains = flat >= top - TIE_RTOL * top.abs()
    return ~(attains & ~inside.flatten(1)).any(dim=1)


def mass_in_box(maps: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """N fractions in [0, 1]: the map's sum inside the box over its sum (an all-zero map: the box's area fraction)."""
    maps, inside = _checked(maps, boxes)
    total = maps.flatten(1).double().sum(dim=1)
    within = (maps * inside).flatten(1).double().sum(dim=1)
    area = inside.flatten(1).double().mean(dim=1)
    return torch.where(total > 0, within / total.clamp_min(1e-300), area).float()


def box_fractions(boxes: torch.Tensor | Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """N fractions: the share of the image's pixels inside each box (chance for both scores)."""
    return box_masks(boxes, height, width).flatten(1).float().mean(dim=1)


@dataclass(frozen=True)
class ScoreRow:
    """One line of the score table: a map of a model, its two scores and chance (percent), over ``images``."""

    map: str
    model: str
    pointing_game: float
    mass_in_box: float
    chance: float
    images: int

    def as_dict(self) -> dict[str, object]:
        """The row as the JSON file holds it."""
        return asdict(self)


def summarise(map_name: str, model: str, hits: torch.Tensor, mass: torch.Tensor, chance: torch.Tensor) -> ScoreRow:
    """Per-image hits, masses and box fractions (all N long) as one row of percentages."""
    n = int(hits.numel())
    if n == 0 or mass.numel() != n or chance.numel() != n:
        raise ValueError(f"summarise: expected the same non-zero number of hits, masses and chances, got "
                         f"{hits.numel()}, {mass.numel()}, {chance.numel()}")
    return ScoreRow(map_name, model, 100 * hits.float().mean().item(), 100 * mass.double().mean().item(),
                    100 * chance.double().mean().item(), n)


def score_rows_table(rows: Sequence[ScoreRow]) -> str:
    """The rows as the aligned plain-text table ``cbam visualize --score`` prints."""
    cells = [dict(zip(SCORE_COLUMNS, (r.map, r.model, r.pointing_game, r.mass_in_box, r.chance, r.images),
                      strict=True)) for r in rows]
    digits = {"pointing game %": 1, "mass in box %": 1, "chance %": 1}
    return format_rows(cells, SCORE_COLUMNS, "table", digits=digits)
