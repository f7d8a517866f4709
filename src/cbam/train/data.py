"""Datasets and loaders for training: torchvision's datasets, plus a synthetic one that needs no download.

``build_datasets`` returns the train and validation datasets with the transforms the paper's training recipe
uses for each family (ImageNet: random-resized crop + flip; CIFAR: pad-and-crop + flip; MNIST: pad-and-crop)
and a ``DataInfo`` with what the model builder needs (classes, input channels, crop size, normalisation).
Every bad input -- unknown name, missing folder or files, unreadable image, impossible batch size -- is a
``ValueError`` with one line saying what was expected and what was found, so the command line can print it
instead of a traceback.

``SyntheticShapes`` is the embedded default: cluttered 64x64 scenes with one class-defining object, generated
deterministically per sample, with the object's bounding box and mask kept for attention visualisation.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.datasets.folder import pil_loader
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from ..data import ClutteredDigits
from .sampler import ResumableSampler, SeededSamples

__all__ = [
    "AUGMENTS",
    "BAD_IMAGE_POLICIES",
    "DATASETS",
    "BadImageError",
    "DataInfo",
    "ImageFolderWithBadImages",
    "SyntheticShapes",
    "build_datasets",
    "build_loader",
]

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "cluttered-digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
AUGMENTS = ("default", "none")
BAD_IMAGE_POLICIES = ("stop", "skip")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Measured over 5000 training images of SyntheticShapes (seed 0, 64x64); close for any seed or size.
SYNTHETIC_MEAN = (0.503, 0.500, 0.502)
SYNTHETIC_STD = (0.231, 0.233, 0.232)
# Measured over the 8000 default training canvases of ClutteredDigits (seed 0, 48x48, 8 fragments).
DIGITS_MEAN = (0.128,)
DIGITS_STD = (0.309,)
GENERATED = ("synthetic", "cluttered-digits")  # data sets made from a seed: no files, no download
GENERATED_SIZES = {"synthetic": 64, "cluttered-digits": 48}  # their image size when none is set


@dataclass
class DataInfo:
    """What the model builder and the training loop need to know about a dataset."""

    num_classes: int
    in_chans: int  # 1 for (fashion-)mnist: grey images go through an in_chans=1 stem, not replicated to RGB
    image_size: int  # training crop size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]


def _imagenet_transforms(size: int, mean, std) -> tuple[v2.Compose, v2.Compose]:
    """The ImageNet recipe: random-resized crop + flip to train; resize to 256/224 of it + centre crop."""
    train = v2.Compose(
        [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *_to_normalised_tensor(mean, std)]
    )
    val = v2.Compose(
        [v2.Resize(int(size * 256 / 224)), v2.CenterCrop(size), *_to_normalised_tensor(mean, std)]
    )
    return train, val


def _small_image_transforms(
    size: int, native: int, padding: int, flip: bool, mean, std
) -> tuple[v2.Compose, v2.Compose]:
    """CIFAR / MNIST recipe: pad and random-crop (+ flip for CIFAR); resize first only for another size."""
    resize = [] if size == native else [v2.Resize(size)]
    pad = max(1, round(padding * size / native))
    train = [*resize, v2.RandomCrop(size, padding=pad)] + ([v2.RandomHorizontalFlip()] if flip else [])
    return v2.Compose(train + _to_normalised_tensor(mean, std)), v2.Compose(
        resize + _to_normalised_tensor(mean, std)
    )


def _synthetic_transforms(mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD) -> tuple[v2.Compose, v2.Compose]:
    """Flip only: the object's position and scale are already random, and crops could cut it off."""
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]
    return v2.Compose([v2.RandomHorizontalFlip(), *norm]), v2.Compose(norm)


# ----------------------------------------------------------------------------------------------------
# Synthetic shapes
# ----------------------------------------------------------------------------------------------------

SHAPE_NAMES = (
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "diamond",
    "horizontal-bars",
    "vertical-bars",
    "checker",
    "ellipse",
    "frame",
    "x-cross",
    "star",
    "tee",
    "ell",
    "half-disc",
)


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    return xx, yy


@lru_cache(maxsize=32)
def _upsample_matrix(k: int, size: int) -> np.ndarray:
    """(size, k) bilinear weights: turn a k x k grid of colours into a smooth size x size field."""
    pos = (np.arange(size) + 0.5) / size * (k - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, k - 2)
    w = (pos - i0).astype(np.float32)
    a = np.zeros((size, k), np.float32)
    a[np.arange(size), i0] = 1 - w
    a[np.arange(size), i0 + 1] = w
    return a


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mask of class ``label`` in box coordinates u, v (-1..1 across the object's box).

    Classes differ by outline or internal structure only; every colour is random.
    """
    name = SHAPE_NAMES[label]
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av)
    r = np.hypot(u, v)
    if name == "circle":
        return r <= 0.95
    if name == "square":
        return box <= 0.85
    if name == "triangle":
        v = v if rng.random() < 0.5 else -v  # points up or down
        return (v >= -0.9) & (v <= 0.9) & (au <= 0.95 * (v + 0.9) / 1.8)
    if name == "plus":
        return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
    if name == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if name == "diamond":
        return au + av <= 0.95
    if name in ("horizontal-bars", "vertical-bars"):
        along = v if name == "horizontal-bars" else u
        return (box <= 0.9) & (np.floor((along + 0.9) / 1.8 * 5) % 2 == 0)
    if name == "checker":
        return (box <= 0.9) & ((np.floor((u + 0.9) / 1.8 * 4) + np.floor((v + 0.9) / 1.8 * 4)) % 2 == 0)
    if name == "ellipse":
        t = rng.uniform(0, math.pi)
        a, b = u * math.cos(t) + v * math.sin(t), -u * math.sin(t) + v * math.cos(t)
        return (a / 0.95) ** 2 + (b / 0.45) ** 2 <= 1
    if name == "frame":
        return (box <= 0.9) & (box >= 0.55)
    if name == "x-cross":
        a, b = np.abs(u + v) / math.sqrt(2), np.abs(u - v) / math.sqrt(2)
        return ((a <= 0.22) & (b <= 1.1)) | ((b <= 0.22) & (a <= 1.1))
    if name == "star":
        t = np.arctan2(v, u) + rng.uniform(0, 2 * math.pi)
        return r <= 0.45 + 0.5 * ((np.cos(5 * t) + 1) / 2) ** 2
    if name == "tee":
        v = v if rng.random() < 0.5 else -v
        return ((v >= -0.9) & (v <= -0.45) & (au <= 0.9)) | ((au <= 0.22) & (av <= 0.9))
    if name == "ell":
        u = u if rng.random() < 0.5 else -u
        return ((u >= -0.9) & (u <= -0.45) & (av <= 0.9)) | ((v >= 0.45) & (v <= 0.9) & (au <= 0.9))
    if name == "half-disc":
        side = [u, -u, v, -v][int(rng.integers(4))]
        return (r <= 0.95) & (side >= -0.1)
    raise AssertionError(name)  # pragma: no cover


def _segment_distance(xx, yy, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
    return np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))


def _window(cx: float, cy: float, radius: float, size: int) -> tuple[slice, slice]:
    """Rows and columns within ``radius`` of (cx, cy): small shapes are drawn on a small patch."""
    r = int(math.ceil(radius)) + 1
    x0, y0 = max(0, int(cx) - r), max(0, int(cy) - r)
    return slice(y0, min(size, int(cy) + r + 1)), slice(x0, min(size, int(cx) + r + 1))


def render_shape_scene(
    rng: np.random.Generator, label: int, size: int = 64
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Draw one scene: (uint8 3xHxW image, bool HxW object mask, (x0, y0, x1, y1) tight box, x1/y1 exclusive).

    Background: smooth random colour field + gradient + faint straight lines. Then 2-4 distractors that are
    not class shapes (dots and blobs at most 1/8 of the image, thin short strokes), then the object on top
    (so it is never occluded) in a colour picked to contrast with what lies beneath, then pixel noise.
    Small shapes are drawn on their own window of the image, which keeps a scene well under a millisecond.
    """
    xx, yy = _pixel_grid(size)
    px = size / 64.0  # distractor and line sizes are given for 64-pixel images

    # Background: low-frequency colour noise, a linear gradient and faint full-length lines.
    k = int(rng.integers(2, 6))
    a = _upsample_matrix(k, size)
    grid = rng.uniform(0.1, 0.9, (3, k, k)).astype(np.float32)
    img = np.matmul(np.matmul(a, grid), a.T)  # (3, H, W): channels first keeps numpy's inner loops long
    t = rng.uniform(0, 2 * math.pi)
    ramp = xx * np.float32(math.cos(t) / size) + yy * np.float32(math.sin(t) / size) - np.float32(0.5)
    img += ramp * rng.uniform(-0.4, 0.4, (3, 1, 1)).astype(np.float32)
    n_lines = int(rng.integers(1, 5))
    t, c = rng.uniform(0, math.pi, (n_lines, 1)), rng.uniform(0, size, (2, n_lines, 1))
    steps = np.arange(-1.42 * size, 1.42 * size, 0.6, dtype=np.float32)  # long enough to cross the image
    xs, ys = (c[0] + steps * np.cos(t)).astype(int), (c[1] + steps * np.sin(t)).astype(int)
    on = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
    which = np.broadcast_to(np.arange(n_lines)[:, None], on.shape)[on]
    xs, ys = xs[on], ys[on]
    alpha = rng.uniform(0.25, 0.6, n_lines).astype(np.float32)[which]
    colour = rng.uniform(0, 1, (3, n_lines)).astype(np.float32)[:, which]
    img[:, ys, xs] = (1 - alpha) * img[:, ys, xs] + alpha * colour

    # Distractors, drawn before the object.
    for _ in range(int(rng.integers(2, 5))):
        kind = int(rng.integers(3))
        cx, cy = rng.uniform(0, size, 2)
        if kind == 0:  # dot, at most 5 px across
            r = rng.uniform(1.0, 2.5) * px
            win = _window(cx, cy, r, size)
            m = np.hypot(xx[win] - cx, yy[win] - cy) <= r
        elif kind == 1:  # thin short stroke
            t, length = rng.uniform(0, 2 * math.pi), rng.uniform(6, 16) * px
            ex, ey = cx + length * math.cos(t), cy + length * math.sin(t)
            win = _window((cx + ex) / 2, (cy + ey) / 2, length / 2 + 1, size)
            m = _segment_distance(xx[win], yy[win], cx, cy, ex, ey) <= rng.uniform(0.5, 0.9) * px
        else:  # small blob: an ellipse at most 8 px long
            t, ra, rb = rng.uniform(0, math.pi), rng.uniform(1.5, 4.0) * px, rng.uniform(1.0, 2.5) * px
            win = _window(cx, cy, ra, size)
            du, dv = xx[win] - cx, yy[win] - cy
            cos, sin = math.cos(t), math.sin(t)
            m = ((du * cos + dv * sin) / ra) ** 2 + ((dv * cos - du * sin) / rb) ** 2 <= 1
        img[:, win[0], win[1]][:, m] = rng.uniform(0, 1, (3, 1)).astype(np.float32)

    # The object: random size 12-32 px (at 64x64), random position fully inside the image.
    side = rng.uniform(0.1875, 0.5) * size
    half = side / 2
    cx, cy = rng.uniform(half, size - half, 2)
    win = _window(cx, cy, half * 1.05, size)
    local = _shape_mask(label, (xx[win] - cx) / half, (yy[win] - cy) / half, rng)
    if not local.any():  # pragma: no cover - every shape covers part of its box
        local = np.hypot(xx[win] - cx, yy[win] - cy) <= half
    patch = img[:, win[0], win[1]]
    under = patch[:, local].mean(axis=1)
    candidates = rng.uniform(0, 1, (2, 3)).astype(np.float32)
    patch[:, local] = candidates[np.argmax(np.linalg.norm(candidates - under, axis=1))][:, None]
    mask = np.zeros((size, size), bool)
    mask[win] = local

    img += (rng.random((3, size, size), dtype=np.float32) - 0.5) * 0.12
    image = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(local)
    y_off, x_off = win[0].start, win[1].start
    box = (x_off + int(xs.min()), y_off + int(ys.min()), x_off + int(xs.max()) + 1, y_off + int(ys.max()) + 1)
    return image, mask, box


class SyntheticShapes(Dataset):
    """Cluttered scenes with one class-defining object: a dataset that needs no download and is not trivial.

    Sample ``i`` of a split is generated from ``(seed, split, i)`` alone (its own ``numpy`` generator), so it
    is the same in any worker, process or order and for any dataset length. The label is ``i % num_classes``
    (balanced). All images are generated in ``__init__`` (under a millisecond each) and kept as uint8.

    ``boxes`` is an (N, 4) float tensor of the object's tight box ``(x0, y0, x1, y1)`` in pixels (x1, y1
    exclusive) of the un-augmented image; ``object_mask(i)`` regenerates the object's pixel mask.
    ``SyntheticShapes.class_names`` lists every available class; an instance's lists its ``num_classes``.
    """

    class_names: tuple[str, ...] = SHAPE_NAMES

    def __init__(
        self,
        num_samples: int,
        *,
        image_size: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        train: bool = True,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        _check_int("synthetic: number of samples", num_samples, minimum=1)
        _check_int("synthetic: image size", image_size, minimum=32)
        _check_int("synthetic: seed", seed, minimum=0)
        most = len(SHAPE_NAMES)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= most:
            raise ValueError(f"synthetic: number of classes must be 2..{most}, got {num_classes!r}")
        self.num_samples, self.image_size, self.num_classes = num_samples, image_size, num_classes
        self.seed, self.train = seed, bool(train)
        self.class_names = SHAPE_NAMES[:num_classes]  # instance attribute shadows the full class-level list
        self.classes = list(self.class_names)  # torchvision's name for it
        self.transform = transform if transform is not None else _synthetic_transforms()[0 if train else 1]

        images = np.empty((num_samples, 3, image_size, image_size), np.uint8)
        boxes = np.empty((num_samples, 4), np.float32)
        for i in range(num_samples):
            images[i], _, boxes[i] = render_shape_scene(self._rng(i), self._label(i), image_size)
        self.images = torch.from_numpy(images)  # (N, 3, H, W) uint8
        self.boxes = torch.from_numpy(boxes)
        self.targets = [self._label(i) for i in range(num_samples)]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0 if self.train else 1, index])

    def _label(self, index: int) -> int:
        return index % self.num_classes

    def object_mask(self, index: int) -> torch.Tensor:
        """Bool (H, W) mask of the object in un-augmented image ``index`` (regenerated, not stored)."""
        _, mask, _ = render_shape_scene(self._rng(index), self._label(index), self.image_size)
        return torch.from_numpy(mask)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def __repr__(self) -> str:
        split = "train" if self.train else "val"
        return (
            f"SyntheticShapes({self.num_samples} {split} images, {self.image_size}x{self.image_size}, "
            f"{self.num_classes} classes, seed {self.seed})"
        )


# ----------------------------------------------------------------------------------------------------
# Image folders with unreadable files
# ----------------------------------------------------------------------------------------------------


class BadImageError(ValueError):
    """An image file PIL cannot decode. One line naming the file, also when re-raised from a loader worker.

    A DataLoader worker's exception is re-created in the main process as ``type(msg)`` with the worker's
    whole traceback as ``msg``; this keeps only the original message, so the command line prints one line.
    """

    def __init__(self, message: str) -> None:
        self.path: str | None = None
        self.reason: str | None = None
        self.worker_traceback: str | None = None
        if "\nOriginal Traceback" in message:
            self.worker_traceback = message
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("BadImageError: ", 1)[-1]
        super().__init__(message)


def _load_image(path: str) -> Image.Image:
    """ImageFolder's PIL loader, with decoding failures turned into a one-line error that names the file."""
    try:
        return pil_loader(path)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        if isinstance(exc, UnidentifiedImageError):  # its message repeats the path inside a file repr
            reason = "not in an image format PIL can decode"
        else:
            reason = _first_line(exc)
        err = BadImageError(
            f"imagefolder: cannot read image {path} ({reason}); fix or delete it, or skip bad images "
            "(--bad-images skip)"
        )
        err.path, err.reason = path, reason
        raise err from exc


class ImageFolderWithBadImages(datasets.ImageFolder):
    """``ImageFolder`` that stops on an unreadable image with a clear error, or skips it and remembers it.

    With ``bad_images="skip"`` an unreadable file is replaced by the next readable sample and its path added
    to ``skipped``, so the training loop can report it. DataLoader workers send the paths to the main process
    through a one-way pipe (no locks, so any start method works, and a worker never blocks on it), so
    ``skipped`` is complete also with ``workers > 0``, once the batches that met the file have arrived.
    """

    def __init__(
        self, root: str | Path, *, transform: Callable | None = None, bad_images: str = "stop"
    ) -> None:
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}")
        super().__init__(str(root), transform=transform, loader=_load_image)
        self.bad_images = bad_images
        self._skipped: list[str] = []
        self._main_pid = os.getpid()
        self._reader, self._writer = (
            multiprocessing.Pipe(duplex=False) if bad_images == "skip" else (None, None)
        )
        self._writer_nonblocking = False

    @property
    def skipped(self) -> list[str]:
        """Paths of the unreadable images skipped so far, in the order they were first met."""
        self._drain()
        return list(self._skipped)

    def _drain(self) -> None:
        if self._reader is None or os.getpid() != self._main_pid:
            return
        while self._reader.poll():
            path = self._reader.recv_bytes().decode("utf-8", "surrogateescape")
            if path not in self._skipped:
                self._skipped.append(path)

    def _record_skip(self, path: str, error: Exception) -> None:
        if path in self._skipped:
            return
        logger.warning("skipping unreadable image %s (%s)", path, getattr(error, "reason", error))
        self._skipped.append(path)
        data = path.encode("utf-8", "surrogateescape")
        # Writes up to PIPE_BUF (4096) bytes are atomic, so workers never interleave; a full pipe drops the
        # message instead of stalling training (the path is still logged above).
        if os.getpid() == self._main_pid or self._writer is None or len(data) > 4000:
            return
        try:
            if not self._writer_nonblocking:
                os.set_blocking(self._writer.fileno(), False)
                self._writer_nonblocking = True
            self._writer.send_bytes(data)
        except OSError:  # BlockingIOError when full; a closed pipe when the main process is gone
            pass

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            try:
                return super().__getitem__(i)
            except BadImageError as err:
                if self.bad_images == "stop":
                    raise
                self._record_skip(self.samples[i][0], err)
        raise ValueError(f"imagefolder: none of the {n} images under {self.root} can be read")

    def __getstate__(self) -> dict[str, Any]:
        # The pipe travels only to a process being started (a DataLoader worker under spawn/forkserver).
        # Anywhere else (deepcopy, torch.save) a copy sharing the descriptors would close them for both, so
        # the copy keeps the skipped list so far and stops collecting from workers.
        from multiprocessing.context import get_spawning_popen

        state = self.__dict__.copy()
        if get_spawning_popen() is None:
            self._drain()
            state.update(_skipped=list(self._skipped), _reader=None, _writer=None)
        return state


# ----------------------------------------------------------------------------------------------------
# torchvision's downloadable datasets
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TorchvisionSpec:
    cls: type
    layout: str  # the expected files, relative to the dataset's folder
    native_size: int
    in_chans: int
    num_classes: int
    padding: int
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def folder(self, root: Path) -> Path:
        if issubclass(self.cls, datasets.CIFAR10):
            return root / self.cls.base_folder
        return root / self.cls.__name__ / "raw"  # MNIST and FashionMNIST read DIR/<ClassName>/raw/*-ubyte

    def files(self) -> list[tuple[str, str | None]]:
        """(file name, md5 or None) that torchvision checks before loading; read from the class itself."""
        if issubclass(self.cls, datasets.CIFAR10):
            entries = [
                *self.cls.train_list,
                *self.cls.test_list,
                [self.cls.meta["filename"], self.cls.meta["md5"]],
            ]
            return [(name, md5) for name, md5 in entries]
        return [(os.path.splitext(os.path.basename(url))[0], None) for url, _ in self.cls.resources]


_TORCHVISION = {
    "mnist": _TorchvisionSpec(
        datasets.MNIST,
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        28,
        1,
        10,
        2,
        False,
        (0.1307,),
        (0.3081,),
    ),
    "fashion-mnist": _TorchvisionSpec(
        datasets.FashionMNIST,
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        28,
        1,
        10,
        2,
        False,
        (0.2860,),
        (0.3530,),
    ),
    "cifar10": _TorchvisionSpec(
        datasets.CIFAR10,
        "{data_batch_1..5,test_batch,batches.meta}",
        32,
        3,
        10,
        4,
        True,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _TorchvisionSpec(
        datasets.CIFAR100,
        "{train,test,meta}",
        32,
        3,
        100,
        4,
        True,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _load_torchvision(name: str, root: Path, train: bool, transform, download: bool) -> Dataset:
    """Construct torchvision's dataset; turn its errors into one line naming the files it expected where."""
    spec = _TORCHVISION[name]
    try:
        return spec.cls(root=str(root), train=train, transform=transform, download=download)
    except Exception as exc:  # RuntimeError (not found / md5), URLError/OSError (download), unpickling errors
        folder = spec.folder(root)
        expected = f"{name}: expected {folder}{os.sep}{spec.layout} (torchvision layout)"
        missing = [f for f, _ in spec.files() if not (folder / f).is_file()]
        if missing:
            how = f"the download failed ({_first_line(exc)})" if download else "pass --download to fetch it"
            what = (
                "none of them is there"
                if len(missing) == len(spec.files())
                else f"missing {', '.join(missing)}"
            )
            raise ValueError(f"{expected}; {what}; {how}") from exc
        corrupt = [
            f for f, md5 in spec.files() if md5 is not None and not check_integrity(str(folder / f), md5)
        ]
        if corrupt:
            raise ValueError(
                f"{expected}; {', '.join(corrupt)} failed the md5 check (corrupt or partial download); "
                "delete it and pass --download"
            ) from exc
        raise ValueError(f"{expected}; the files there cannot be read ({_first_line(exc)})") from exc


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def _check_int(what: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _data_root(name: str, data_dir: str | Path | None, download: bool, layout: str) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise ValueError(f"{name}: needs a data directory (--data-dir DIR) holding {layout}")
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{name}: data directory {root} is a file, expected a directory holding {layout}")
    if not root.exists():
        if not download:
            hint = "" if name == "imagefolder" else "; pass --download to fetch it"
            raise ValueError(
                f"{name}: data directory {root} does not exist; expected it to hold {layout}{hint}"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{name}: cannot create data directory {root} ({_first_line(exc)})") from exc
    return root


def _build_imagefolder(
    root: Path, train_tf, val_tf, bad_images: str
) -> tuple[ImageFolderWithBadImages, ImageFolderWithBadImages]:
    expected = (
        f"imagefolder: expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageNet layout)"
    )
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"{expected}; {root / split} is missing")
    splits = {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        folder = root / split
        try:
            splits[split] = ImageFolderWithBadImages(folder, transform=tf, bad_images=bad_images)
        except FileNotFoundError as exc:  # no class folders, or a class folder without images
            raise ValueError(f"{expected}; in {folder}: {str(exc).strip()}") from exc
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:

        def listing(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "none"

        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"imagefolder: {root}/val must have the same class folders as {root}/train "
            f"({len(train.classes)} vs {len(val.classes)}); only in train: {listing(only_train)}; "
            f"only in val: {listing(only_val)}"
        )
    return train, val


def build_datasets(
    name: str,
    data_dir: str | Path | None,
    *,
    download: bool = False,
    image_size: int | None = None,
    augment: str = "default",
    synthetic_train_size: int = 5000,
    synthetic_val_size: int = 1000,
    synthetic_seed: int = 0,
    synthetic_classes: int = 10,
    clutter: int = 8,
    bad_images: str = "stop",
) -> tuple[Dataset, Dataset, DataInfo]:
    """Train and validation datasets with their family's standard transforms, and what the model needs.

    ``augment="none"`` gives the training split the validation transform (for debugging and overfit tests).
    ``image_size`` defaults to the native size (synthetic 64, CIFAR 32, MNIST 28) or 224 for image folders;
    for CIFAR/MNIST another size resizes the images first. ``data_dir`` is ignored for the generated data sets
    (``synthetic``, ``cluttered-digits``): their sizes and seed are the ``synthetic_*`` arguments, and ``clutter`` is
    the number of digit fragments on a cluttered-digits canvas (whose side is ``image_size``, default 48).
    """
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; expected one of: {', '.join(AUGMENTS)}")
    if bad_images not in BAD_IMAGE_POLICIES:
        choices = ", ".join(BAD_IMAGE_POLICIES)
        raise ValueError(f"unknown bad-images policy {bad_images!r}; expected one of: {choices}")
    if image_size is not None:
        _check_int("image size", image_size, minimum=8)

    if key == "synthetic":
        size = GENERATED_SIZES[key] if image_size is None else image_size
        for what, value in (("train size", synthetic_train_size), ("val size", synthetic_val_size)):
            _check_int(f"synthetic: {what}", value, minimum=1)
        train_tf, val_tf = _synthetic_transforms()
        common = {"image_size": size, "num_classes": synthetic_classes, "seed": synthetic_seed}
        train = SyntheticShapes(
            synthetic_train_size, train=True, transform=train_tf if augment == "default" else val_tf, **common
        )
        val = SyntheticShapes(synthetic_val_size, train=False, transform=val_tf, **common)
        info = DataInfo(synthetic_classes, 3, size, SYNTHETIC_MEAN, SYNTHETIC_STD, train.class_names)
        return train, val, info

    if key == "cluttered-digits":
        size = GENERATED_SIZES[key] if image_size is None else image_size
        for what, value in (("train size", synthetic_train_size), ("val size", synthetic_val_size)):
            _check_int(f"cluttered-digits: {what}", value, minimum=1)
        # No augmentation: the digit's position is already random, and a flip or crop would change or cut it.
        tf = v2.Compose(_to_normalised_tensor(DIGITS_MEAN, DIGITS_STD)[1:])
        common = {"image_size": size, "clutter": clutter, "seed": synthetic_seed, "transform": tf}
        train = ClutteredDigits(synthetic_train_size, train=True, **common)
        val = ClutteredDigits(synthetic_val_size, train=False, **common)
        return train, val, DataInfo(10, 1, size, DIGITS_MEAN, DIGITS_STD, train.class_names)

    if key == "imagefolder":
        layout = "train/<class>/<image> and val/<class>/<image> (ImageNet layout)"
        root = _data_root(key, data_dir, False, layout)
        if download:
            logger.warning("imagefolder: nothing to download; using the images under %s", root)
        size = 224 if image_size is None else image_size
        train_tf, val_tf = _imagenet_transforms(size, IMAGENET_MEAN, IMAGENET_STD)
        train, val = _build_imagefolder(
            root, train_tf if augment == "default" else val_tf, val_tf, bad_images
        )
        info = DataInfo(len(train.classes), 3, size, IMAGENET_MEAN, IMAGENET_STD, tuple(train.classes))
        return train, val, info

    spec = _TORCHVISION[key]
    layout = f"{spec.folder(Path('.'))}{os.sep}{spec.layout} (torchvision layout)"
    root = _data_root(key, data_dir, download, layout)
    size = spec.native_size if image_size is None else image_size
    train_tf, val_tf = _small_image_transforms(
        size, spec.native_size, spec.padding, spec.flip, spec.mean, spec.std
    )
    train = _load_torchvision(key, root, True, train_tf if augment == "default" else val_tf, download)
    val = _load_torchvision(key, root, False, val_tf, download)
    names = tuple(getattr(train, "classes", ()))
    return train, val, DataInfo(spec.num_classes, spec.in_chans, size, spec.mean, spec.std, names)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    accum_steps: int = 1,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A loader whose order and augmentation depend only on (seed, epoch, index): resumable to the sample.

    ``batch_size`` is the global batch over ``world_size`` processes; each process loads its
    ``batch_size / (world_size * accum_steps)`` micro-batches (see ``ResumableSampler``). Training shuffles per
    epoch and drops a last partial batch; validation is sequential and complete. The caller selects the epoch
    with ``loader.sampler.set_epoch(epoch, start_batch)``.
    """
    _check_int("batch size", batch_size, minimum=1)
    _check_int("number of data workers", workers, minimum=0)
    _check_int("loader seed", seed, minimum=0)
    _check_int("gradient accumulation steps", accum_steps, minimum=1)
    if workers > 0:
        _check_int("prefetch factor", prefetch_factor, minimum=1)
    n = len(dataset)  # type: ignore[arg-type]
    split = "training" if train else "validation"
    if n == 0:
        raise ValueError(f"the {split} dataset is empty")
    if train and batch_size > n:
        raise ValueError(
            f"batch size {batch_size} is larger than the {n} {split} images; "
            "lower the batch size (a last partial batch is dropped, so no batch would be left)"
        )
    if batch_size % (world_size * accum_steps):
        raise ValueError(
            f"batch size {batch_size} must divide evenly over {world_size} process(es) x "
            f"{accum_steps} accumulation step(s)"
        )
    sampler = ResumableSampler(
        n, global_batch=batch_size, shuffle=train, seed=seed, rank=rank, world_size=world_size, drop_last=train
    )
    extra: dict[str, Any] = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if workers > 0 else {}
    return DataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch_size // (world_size * accum_steps),
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        **extra,
    )
