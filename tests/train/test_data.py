"""Tests for cbam.train.data: every dataset family loads from files in torchvision's own layout (written here,
since nothing can be downloaded), and every bad input is a one-line ValueError naming what was expected."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import datasets

from cbam.train.data import (
    DATASETS,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    DataInfo,
    SyntheticShapes,
    build_datasets,
    build_loader,
)

# ----------------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------------


def _raw(ds: SyntheticShapes, i: int) -> torch.Tensor:
    """The un-normalised image in [0, 1]."""
    return ds.images[i].float() / 255


def test_synthetic_is_deterministic_per_seed_and_index():
    a = SyntheticShapes(12, seed=3, train=False)
    b = SyntheticShapes(12, seed=3, train=False)
    assert torch.equal(a[5][0], a[5][0])
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    # A sample depends on (seed, split, index) only, not on the dataset's length.
    longer = SyntheticShapes(20, seed=3, train=False)
    assert torch.equal(longer.images[:12], a.images) and torch.equal(longer.boxes[:12], a.boxes)
    other_seed = SyntheticShapes(12, seed=4, train=False)
    assert not torch.equal(other_seed.images, a.images)
    train = SyntheticShapes(12, seed=3, train=True)
    assert all(not torch.equal(train.images[i], a.images[i]) for i in range(12))


def test_synthetic_shapes_dtypes_labels_and_names():
    ds = SyntheticShapes(40, num_classes=10, train=False)
    x, y = ds[7]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and type(x) is torch.Tensor
    assert isinstance(y, int) and y == 7
    labels = [ds[i][1] for i in range(len(ds))]
    assert set(labels) == set(range(10)) and all(labels.count(c) == 4 for c in range(10))
    # normalised with the dataset's statistics
    expected = (_raw(ds, 7) - torch.tensor(SYNTHETIC_MEAN)[:, None, None]) / torch.tensor(SYNTHETIC_STD)[
        :, None, None
    ]
    assert torch.allclose(x, expected, atol=1e-5)
    assert ds.class_names == SyntheticShapes.class_names[:10] and len(set(SyntheticShapes.class_names)) >= 10
    assert len(SyntheticShapes(4, num_classes=3).class_names) == 3
    small = SyntheticShapes(3, image_size=32)
    assert small[0][0].shape == (3, 32, 32)


def test_synthetic_boxes_hold_the_object():
    ds = SyntheticShapes(60, train=False, seed=1)
    assert ds.boxes.shape == (60, 4) and ds.boxes.dtype == torch.float32
    x0, y0, x1, y1 = ds.boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all()
    sides = torch.maximum(x1 - x0, y1 - y0)
    assert (sides >= 8).all() and (sides <= 33).all()
    contrast = []
    for i in range(len(ds)):
        mask = ds.object_mask(i)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        box = (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]))
        assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == box
        img = _raw(ds, i)
        inside = img[:, mask]  # one colour plus +-6% noise
        assert inside.std(dim=1).max() < 0.05
        ring = torch.zeros_like(mask)
        ring[max(0, box[1] - 3) : box[3] + 3, max(0, box[0] - 3) : box[2] + 3] = True
        ring[box[1] : box[3], box[0] : box[2]] = False
        contrast.append((inside.mean(1) - img[:, ring].mean(1)).norm().item())
    # The object stands out from what surrounds it in (nearly) every image.
    assert np.mean(np.array(contrast) > 0.1) >= 0.9


def test_synthetic_train_split_flips_only():
    ds = SyntheticShapes(6, train=True)
    raw = ds.images[2].float() / 255
    norm = (raw - torch.tensor(SYNTHETIC_MEAN)[:, None, None]) / torch.tensor(SYNTHETIC_STD)[:, None, None]
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        x, _ = ds[2]
        if torch.allclose(x, norm, atol=1e-5):
            seen.add("plain")
        elif torch.allclose(x, norm.flip(-1), atol=1e-5):
            seen.add("flipped")
        else:
            raise AssertionError("training transform did something other than a horizontal flip")
    assert seen == {"plain", "flipped"}


def test_synthetic_through_build_datasets_and_loader():
    train, val, info = build_datasets(
        "synthetic", None, synthetic_train_size=24, synthetic_val_size=10, synthetic_classes=4
    )
    assert info == DataInfo(4, 3, 64, SYNTHETIC_MEAN, SYNTHETIC_STD, train.class_names)
    assert len(train) == 24 and len(val) == 10 and not val.train
    x, y = next(iter(build_loader(train, batch_size=8, train=True)))
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32 and y.shape == (8,) and int(y.max()) < 4
    batches = list(build_loader(val, batch_size=4, train=False))
    assert [len(b[1]) for b in batches] == [4, 4, 2]  # validation keeps the last partial batch


def test_augment_none_gives_training_the_validation_transform():
    train, _, _ = build_datasets(
        "synthetic", None, synthetic_train_size=4, synthetic_val_size=2, augment="none"
    )
    torch.manual_seed(0)
    assert all(torch.equal(train[1][0], train[1][0]) for _ in range(8))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"synthetic_classes": 1}, "number of classes"),
        ({"synthetic_classes": 99}, "number of classes"),
        ({"synthetic_train_size": 0}, "train size"),
        ({"image_size": 16}, "image size"),
        ({"augment": "heavy"}, "augmentation"),
        ({"bad_images": "ignore"}, "bad-images"),
    ],
)
def test_synthetic_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words) as err:
        build_datasets(
            "synthetic", None, synthetic_train_size=kwargs.pop("synthetic_train_size", 4), **kwargs
        )
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------
# mnist / fashion-mnist: idx files in DIR/<ClassName>/raw/, which torchvision 0.29 reads without an md5 check
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_from_raw_files(tmp_path, name, folder, fake_mnist):
    fake_mnist(tmp_path, folder)
    train, val, info = build_datasets(name, tmp_path)
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 28) and len(info.mean) == 1
    assert len(train) == 12 and len(val) == 6
    x, y = next(iter(build_loader(train, batch_size=4, train=True)))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    xv, yv = next(iter(build_loader(val, batch_size=6, train=False)))
    assert xv.shape == (6, 1, 28, 28) and yv.tolist() == [0, 1, 2, 3, 4, 5]


def test_mnist_resized(tmp_path, fake_mnist):
    fake_mnist(tmp_path, "MNIST")
    train, val, info = build_datasets("mnist", tmp_path, image_size=32)
    assert info.image_size == 32 and train[0][0].shape == (1, 32, 32) and val[0][0].shape == (1, 32, 32)


def test_mnist_missing_files_name_the_expected_path(tmp_path):
    with pytest.raises(ValueError) as err:
        build_datasets("mnist", tmp_path)
    msg = str(err.value)
    assert f"expected {tmp_path / 'MNIST' / 'raw'}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte" in msg
    assert "--download" in msg
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="missing train-images-idx3-ubyte, t10k-images"):
        build_datasets("mnist", tmp_path)
    assert "\n" not in msg


def test_mnist_unreadable_file(tmp_path, fake_mnist):
    fake_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match="cannot be read"):
        build_datasets("mnist", tmp_path)


# ----------------------------------------------------------------------------------------------------
# cifar10 / cifar100: pickled batches; torchvision checks each file's md5 against the real release
# ----------------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar(root: Path, monkeypatch, cls: type, per_file: int = 4) -> None:
    """Write fake batches and point ``cls``'s md5 table at them.

    torchvision's ``_check_integrity`` compares each file's md5 with the real release's; fake files cannot
    match, so (in this test only) the class's md5 table is monkeypatched to the fakes' md5s. torchvision's own
    check still runs, on the files we wrote.
    """
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if cls is datasets.CIFAR10 else "fine_labels"
    num_classes = 10 if cls is datasets.CIFAR10 else 100

    def write(name: str, obj: dict) -> list[str]:
        path = folder / name
        path.write_bytes(pickle.dumps(obj))
        return [name, _md5(path)]

    def batch(n: int) -> dict:
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: list(np.arange(n) % num_classes),
        }

    train_list = [write(name, batch(per_file)) for name, _ in cls.train_list]
    test_list = [write(name, batch(per_file)) for name, _ in cls.test_list]
    names = [f"class{i}" for i in range(num_classes)]
    _, meta_md5 = write(cls.meta["filename"], {cls.meta["key"]: names})
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": meta_md5})


@pytest.mark.parametrize(
    "name, cls, n_train", [("cifar10", datasets.CIFAR10, 20), ("cifar100", datasets.CIFAR100, 4)]
)
def test_cifar_from_pickled_batches(tmp_path, monkeypatch, name, cls, n_train):
    _fake_cifar(tmp_path, monkeypatch, cls)
    train, val, info = build_datasets(name, tmp_path)
    assert (info.num_classes, info.in_chans, info.image_size) == (len(info.class_names), 3, 32)
    assert len(train) == n_train and len(val) == 4
    x, y = next(iter(build_loader(train, batch_size=4, train=True)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    xv, _ = next(iter(build_loader(val, batch_size=4, train=False)))
    # validation images are only normalised: back to the stored pixels
    mean, std = torch.tensor(info.mean)[:, None, None], torch.tensor(info.std)[:, None, None]
    stored = torch.from_numpy(val.data[0]).permute(2, 0, 1).float() / 255
    assert torch.allclose(xv[0] * std + mean, stored, atol=1e-5)


@pytest.mark.parametrize(
    "name, folder, first_file",
    [("cifar10", "cifar-10-batches-py", "data_batch_1"), ("cifar100", "cifar-100-python", "train")],
)
def test_cifar_missing_files_name_the_expected_path(tmp_path, name, folder, first_file):
    with pytest.raises(ValueError) as err:
        build_datasets(name, tmp_path)
    msg = str(err.value)
    assert f"expected {tmp_path / folder}" in msg and first_file in msg and "--download" in msg
    assert "none of them is there" in msg
    assert "\n" not in msg


def test_cifar_corrupt_file_is_named(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, monkeypatch, datasets.CIFAR10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="data_batch_3 failed the md5 check"):
        build_datasets("cifar10", tmp_path)


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    target = tmp_path / "new"
    with pytest.raises(ValueError, match=r"none of them is there; the download failed \(URLError") as err:
        build_datasets("cifar10", target, download=True)
    assert target.is_dir() and "\n" not in str(err.value)  # --download creates the directory


@pytest.mark.parametrize("data_dir", [None, "does-not-exist"])
def test_missing_data_dir(tmp_path, data_dir):
    with pytest.raises(ValueError, match="data directory") as err:
        build_datasets("cifar10", None if data_dir is None else tmp_path / data_dir)
    assert "cifar-10-batches-py" in str(err.value)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError) as err:
        build_datasets("imagenet-21k", None)
    assert all(name in str(err.value) for name in DATASETS)


# ----------------------------------------------------------------------------------------------------
# imagefolder
# ----------------------------------------------------------------------------------------------------


def _fake_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 3, val_classes=None) -> Path:
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"img{i}.png")
    bad = root / "train" / "cat" / "img1_corrupt.png"
    bad.write_bytes(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    return bad


def test_imagefolder_loads_with_imagenet_transforms(tmp_path):
    _fake_imagefolder(tmp_path)
    train, val, info = build_datasets("imagefolder", tmp_path, image_size=32, bad_images="skip")
    assert info.num_classes == 2 and info.class_names == ("cat", "dog") and info.in_chans == 3
    assert len(train) == 7 and len(val) == 6
    x, y = next(iter(build_loader(val, batch_size=6, train=False)))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    x, _ = train[0]
    assert x.shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["random bytes", "truncated png"])
def test_imagefolder_bad_image_stop_names_the_file(tmp_path, kind):
    bad = _fake_imagefolder(tmp_path)
    if kind == "truncated png":
        good = (tmp_path / "train" / "cat" / "img0.png").read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    train, _, _ = build_datasets("imagefolder", tmp_path, image_size=32)
    with pytest.raises(ValueError) as err:
        list(build_loader(train, batch_size=2, train=False))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_imagefolder_bad_image_stop_from_a_worker_is_still_one_line(tmp_path):
    bad = _fake_imagefolder(tmp_path)
    train, _, _ = build_datasets("imagefolder", tmp_path, image_size=32)
    with pytest.raises(ValueError) as err:
        list(build_loader(train, batch_size=2, train=False, workers=1))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_bad_image_skip_records_the_file(tmp_path, workers):
    bad = _fake_imagefolder(tmp_path)
    train, _, _ = build_datasets("imagefolder", tmp_path, image_size=32, bad_images="skip")
    loader = build_loader(train, batch_size=7, train=False, workers=workers)
    for _ in range(2):  # met twice, recorded once
        ((x, y),) = list(loader)
        assert x.shape == (7, 3, 32, 32)
    assert train.skipped == [str(bad)]


def test_imagefolder_class_mismatch(tmp_path):
    _fake_imagefolder(tmp_path, classes=("cat", "dog"), val_classes=("cat", "fox"))
    with pytest.raises(ValueError, match="only in train: dog; only in val: fox"):
        build_datasets("imagefolder", tmp_path)


def test_imagefolder_missing_split(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"expected .*train/<class>/<image>.*val is missing"):
        build_datasets("imagefolder", tmp_path)


# ----------------------------------------------------------------------------------------------------
# build_loader
# ----------------------------------------------------------------------------------------------------


def _indices(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def _order(loader) -> list[int]:
    return [i for (batch,) in loader for i in batch.tolist()]


def test_loader_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="batch size 512 is larger than the 100 training images"):
        build_loader(_indices(100), batch_size=512, train=True)
    assert len(build_loader(_indices(100), batch_size=512, train=False)) == 1  # validation keeps every image


def test_loader_seeded_order_per_epoch():
    train = build_loader(_indices(20), batch_size=5, train=True, seed=7)
    assert train.pin_memory == torch.cuda.is_available()
    first = _order(train)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert _order(build_loader(_indices(20), batch_size=5, train=True, seed=7)) == first
    assert _order(build_loader(_indices(20), batch_size=5, train=True, seed=8)) != first
    train.sampler.set_epoch(1)
    second = _order(train)
    assert second != first and sorted(second) == list(range(20))
    train.sampler.set_epoch(1, start_batch=2)  # resume after two batches: exactly the rest of the epoch
    assert _order(train) == second[10:]
    val = build_loader(_indices(22), batch_size=6, train=False)
    assert _order(val) == list(range(22))


def test_loader_drops_a_partial_training_batch():
    assert len(_order(build_loader(_indices(22), batch_size=5, train=True))) == 20


def test_loader_worker_options():
    loader = build_loader(_indices(20), batch_size=5, train=True, workers=2, pin_memory=False)
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 2
    assert not build_loader(_indices(20), batch_size=5, train=True).persistent_workers


def test_loader_ranks_split_each_global_batch_like_accumulation():
    ranks = [_order(build_loader(_indices(20), batch_size=10, train=True, rank=r, world_size=2, seed=3))
             for r in range(2)]
    accum = build_loader(_indices(20), batch_size=10, train=True, accum_steps=2, seed=3)
    micro = [batch.tolist() for (batch,) in accum]
    assert micro == [ranks[0][0:5], ranks[1][0:5], ranks[0][5:10], ranks[1][5:10]]
    val = [_order(build_loader(_indices(21), batch_size=8, train=False, rank=r, world_size=2)) for r in range(2)]
    assert sorted(val[0] + val[1]) == list(range(21))


def test_augmentation_depends_on_seed_epoch_and_index_only():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(1)

    def draws(workers, epoch=0):
        loader = build_loader(Noisy(), batch_size=4, train=True, workers=workers, seed=1)
        loader.sampler.set_epoch(epoch)
        return torch.cat(list(loader))

    torch.manual_seed(123)
    a = draws(0)
    torch.manual_seed(456)
    assert torch.equal(a, draws(0)) and torch.equal(a, draws(1))
    assert not torch.equal(a, draws(0, epoch=1))


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"batch_size": 2, "workers": -1}, {"batch_size": 2.5}, {"batch_size": 5, "world_size": 2}],
)
def test_loader_bad_numbers(kwargs):
    with pytest.raises(ValueError):
        build_loader(_indices(20), train=True, **kwargs)
