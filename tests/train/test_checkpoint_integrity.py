"""Checkpoint integrity, the mode of written files, a torn metrics line and the bad-image count (issue 13).

Each row runs the real command line in its own process (``python -m cbam ...``) on tiny synthetic data or a tiny
image folder, and damages files the way a disk, a copy or a crash would.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cbam.train.checkpoint import (
    CheckpointError,
    digest_path,
    load_checkpoint,
    load_weights,
    previous_path,
    save_checkpoint,
)

TINY = [  # the step schedule: --resume may add epochs (under cosine, the default, the epochs define the run)
    "--dataset", "synthetic", "--model", "cifar_resnet20", "--image-size", "32",
    "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--batch-size", "16", "--lr", "0.05",
    "--no-progress", "--workers", "0", "--schedule", "step",
]


def cbam(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    """``python -m cbam ARGS`` in a fresh process (optionally under another umask)."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "cbam", *args], capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec)


def train_run(out: Path, *extra: str, umask: int | None = None) -> subprocess.CompletedProcess:
    proc = cbam("train", *TINY, "--output", str(out), *extra, umask=umask)
    assert proc.returncode == 0, proc.stderr
    return proc


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of the largest tensor's storage inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as zf:
        member = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert member.compress_type == zipfile.ZIP_STORED and member.file_size >= 2 * n
    with open(path, "r+b") as f:
        f.seek(member.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
        start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        f.seek(start)
        data = f.read(n)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def flip_safetensors_bytes(path: Path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of a .safetensors file's tensor data (after its JSON header)."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    start = 8 + header_len + (len(raw) - 8 - header_len) // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------------ checkpoint integrity
@pytest.mark.slow  # subprocess runs: CI's slow phase
def test_flipped_last_checkpoint_is_refused_and_the_previous_good_one_used(tmp_path):
    out = tmp_path / "run"
    train_run(out, "--epochs", "2", "--save-every-steps", "1")
    ckpt = out / "checkpoints"
    last, prev = ckpt / "last.pt", previous_path(ckpt / "last.pt")
    assert prev == ckpt / "last.prev.pt" and prev.is_file() and digest_path(prev).is_file()
    good_prev = load_checkpoint(prev)
    assert load_checkpoint(last)["step"] == good_prev["step"] + 1  # the one saved just before it

    flip_tensor_bytes(last)
    torch.load(last, map_location="cpu", weights_only=True)  # torch alone takes the damaged file without a word
    proc = cbam("train", *TINY, "--output", str(out), "--epochs", "3", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "integrity" in line]
    assert len(said) == 1, proc.stdout + proc.stderr
    assert str(last) in said[0] and str(prev) in said[0] and "previous good checkpoint" in said[0]
    assert f"resuming {prev}" in proc.stdout
    assert f"step {good_prev['step']}" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # the run went on: its new last.pt and last.prev.pt are whole again
    assert load_checkpoint(last)["epoch"] == 3 and load_checkpoint(prev)["step"] < load_checkpoint(last)["step"]


@pytest.mark.slow  # a real training run in a subprocess; CI runs the slow tests too
def test_flipped_last_checkpoint_without_a_previous_one_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    train_run(out, "--epochs", "1")
    last = out / "checkpoints" / "last.pt"
    previous_path(last).unlink(missing_ok=True)
    digest_path(previous_path(last)).unlink(missing_ok=True)
    flip_tensor_bytes(last)
    damaged = last.read_bytes()
    proc = cbam("train", *TINY, "--output", str(out), "--epochs", "2", "--resume")
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(last) in line and "integrity check" in line and "SHA-256" in line
    assert last.read_bytes() == damaged  # nothing written over it


@pytest.mark.slow  # a real training run in a subprocess; CI runs the slow tests too
def test_flipped_checkpoint_is_refused_by_eval(tmp_path):
    out = tmp_path / "run"
    train_run(out, "--epochs", "1", "--save-every-steps", "1")
    last = out / "checkpoints" / "last.pt"
    flip_tensor_bytes(last)
    proc = cbam("eval", "--checkpoint", str(last))
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(last) in line and "integrity check" in line and str(previous_path(last)) in line
    assert cbam("eval", "--checkpoint", str(previous_path(last))).returncode == 0  # the fallback it names

    best = out / "checkpoints" / "best.pt"
    flip_tensor_bytes(best)
    proc = cbam("eval", "--checkpoint", str(best))
    assert proc.returncode == 2 and str(best) in one_line(proc.stderr)


@pytest.mark.slow  # subprocess runs: CI's slow phase
def test_flipped_weights_are_refused(tmp_path):
    out = tmp_path / "run"
    train_run(out, "--epochs", "1")
    weights = out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert len(f.metadata()["sha256"]) == 64
    flip_safetensors_bytes(weights)
    for target in (weights, out):  # the file, and the run folder (which reads it)
        proc = cbam("eval", "--checkpoint", str(target))
        assert proc.returncode == 2, target
        line = one_line(proc.stderr)
        assert str(weights) in line and "integrity check" in line


@pytest.mark.slow  # a real training run in a subprocess; CI runs the slow tests too
def test_files_without_digest_still_load_with_a_warning(tmp_path):
    out = tmp_path / "run"
    train_run(out, "--epochs", "1")
    # a checkpoint and weights as written before digests existed
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    state.pop("integrity")
    torch.save(state, legacy / "checkpoints" / "last.pt")
    (legacy / "config.yaml").write_text((out / "config.yaml").read_text())
    tensors = load_weights(out / "model.safetensors")
    save_file(tensors, str(legacy / "model.safetensors"), metadata={"model": "cifar_resnet20"})

    for target in (legacy / "checkpoints" / "last.pt", legacy / "model.safetensors"):
        proc = cbam("eval", "--checkpoint", str(target))
        assert proc.returncode == 0, proc.stderr
        assert "no digest" in proc.stderr and str(target) in proc.stderr and "Traceback" not in proc.stderr

    proc = cbam("train", *TINY, "--output", str(legacy), "--epochs", "2", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "no digest" in proc.stderr
    assert digest_path(legacy / "checkpoints" / "last.pt").is_file()  # what it writes now carries one


def test_a_checkpoint_whose_digest_file_is_lost_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    assert load_checkpoint(path)["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    digest_path(path).unlink()
    with pytest.raises(CheckpointError, match="digest file c.pt.sha256 is missing"):
        load_checkpoint(path)


def test_previous_checkpoint_is_kept_only_when_whole(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {}, "step": 1}, keep_previous=True)
    assert not previous_path(path).exists()
    save_checkpoint(path, {"model": {}, "step": 2}, keep_previous=True)
    assert load_checkpoint(previous_path(path))["step"] == 1
    path.write_bytes(path.read_bytes()[:-10])  # last.pt damaged: never kept as the fallback
    save_checkpoint(path, {"model": {}, "step": 3}, keep_previous=True)
    assert load_checkpoint(previous_path(path))["step"] == 1 and load_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.prev.pt.sha256", "last.pt",
                                                          "last.pt.sha256"]


# ------------------------------------------------------------------------------------------ written files' mode
@pytest.mark.slow  # a real training run in a subprocess; CI runs the slow tests too
def test_written_files_get_the_umask_mode(tmp_path):
    out = tmp_path / "run"
    umask = 0o027
    train_run(out, "--epochs", "1", "--save-every-steps", "1", umask=umask)
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    for name in ("model.safetensors", "checkpoints/last.pt", "checkpoints/last.pt.sha256", "checkpoints/best.pt",
                 "checkpoints/last.prev.pt", "summary.json", "config.yaml", "curves.png"):
        assert name in names, name
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ------------------------------------------------------------------------------------------ torn metrics line
@pytest.mark.slow  # subprocess runs: CI's slow phase
def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    out = tmp_path / "run"
    train_run(out, "--epochs", "2")
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"epoch": 3, "step": 12, "train_lo')  # a write cut short
    proc = cbam("train", *TINY, "--output", str(out), "--epochs", "3", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    said = [line for line in proc.stdout.splitlines() if "dropped a torn last line" in line]
    assert len(said) == 1 and str(metrics) in said[0]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "train_loss" in rows[-1]


@pytest.mark.slow  # a real training run in a subprocess; CI runs the slow tests too
def test_a_bad_metrics_line_before_the_last_is_one_line(tmp_path):
    out = tmp_path / "run"
    train_run(out, "--epochs", "1")
    metrics = out / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())
    proc = cbam("train", *TINY, "--output", str(out), "--epochs", "2", "--resume")
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(metrics) in line and "line 1" in line


# ------------------------------------------------------------------------------------------ skipped bad images
def _image_folder(root: Path) -> list[Path]:
    """train/ and val/ with two classes of small PNGs, and one unreadable file in each split."""
    rng = np.random.default_rng(0)
    bad = []
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
        path = root / split / "cat" / "broken.png"
        path.write_bytes(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
        bad.append(path)
    return bad


@pytest.mark.slow  # a real training run in a subprocess; CI runs the slow tests too
def test_skipped_bad_images_are_counted_in_the_log_and_the_summary(tmp_path):
    bad = _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    proc = cbam("train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--bad-images", "skip",
                "--model", "cifar_resnet20", "--image-size", "32", "--batch-size", "3", "--epochs", "1",
                "--no-progress", "--workers", "0", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    for path in bad:
        assert str(path) in log
    assert "skipped 2 unreadable image(s)" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["bad_images_skipped"] == 2

    clean = tmp_path / "clean"
    train_run(clean, "--epochs", "1")
    assert json.loads((clean / "summary.json").read_text())["bad_images_skipped"] == 0
