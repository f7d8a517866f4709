"""``cbam demo`` end to end at a tiny size: plain, SE and CBAM over two seeds on the cluttered digits, the honest
report (chance, seeds, spread verdicts, side-by-side speed), then the pictures and the score."""

from __future__ import annotations

import json

import pytest

from cbam.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ("model: cifar_resnet8\ndataset: cluttered-digits\nimage_size: 32\nclutter: 2\nsynthetic_train_size: 32\n"
        "synthetic_val_size: 16\nepochs: 1\nbatch_size: 16\nlr: 0.05\ntensorboard: false\nworkers: 0\n")


def test_demo_trains_three_networks_over_two_seeds_and_draws_what_cbam_attends_to(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    root = tmp_path / "demo"
    assert main(["demo", "--config", str(tmp_path / "tiny.yaml"), "--no-progress", "--seeds", "0,1",
                 "--pictures", "2", "--output", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cluttered-digits, cifar_resnet8, 1 epochs, 2 seed(s) per network (0, 1)" in out
    assert "chance is 90.0 % top-1 error (10 classes)" in out
    for name in ("SE - plain", "CBAM - plain"):
        line = next(x for x in out.splitlines() if x.startswith(name))
        assert ("larger than the seed-to-seed spread" in line or "within the seed-to-seed spread" in line
                or "not judged: the seeds gave identical errors" in line), line
    assert "±" in out and "per seed" in out and "train images/s" in out
    for name in ("plain", "se", "cbam"):
        for seed in (0, 1):
            assert (root / f"{name}-seed{seed}" / "summary.json").exists()
    report = json.loads((root / "results.json").read_text())
    assert report["seeds"] == [0, 1] and report["chance_top1_err"] == pytest.approx(90.0)
    assert set(report["differences_to_plain"]) == {"se", "cbam"}
    assert len(report["per_seed_top1_err"]["cbam"]) == 2
    # the pictures of the first seed's CBAM network next to its plain one, and the score over the boxes
    pictures = root / "pictures"
    assert (pictures / "image_000.png").exists() and (pictures / "image_001.png").exists()
    assert (pictures / "channel_gates.png").exists() and (pictures / "score.json").exists()
    assert "pointing" in out.lower() and str(pictures) in out
