"""Fixtures for the training tests: data sets written in torchvision's own on-disk layout."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, folder: str, n_train: int = 12, n_test: int = 6) -> None:
    """MNIST-format idx files in DIR/<folder>/raw/ (torchvision 0.29 reads them without an md5 check)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


@pytest.fixture
def fake_mnist():
    return write_fake_mnist
