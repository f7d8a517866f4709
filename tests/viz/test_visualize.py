"""``cbam visualize``: pictures of the expected size that are not blank, the channel-gate figure, a sane score.json,
Grad-CAM that leaves the model as it was, and every bad input as one line and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cbam
from cbam.cli import main
from cbam.train.engine import datasets_for, load_run
from cbam.viz import Recording, attention_stages, grad_cam, gradcam_layer, visualize
from cbam.viz.figures import CHANNEL_INCHES, DPI, PANEL_INCHES, Panel, image_figure, save_png, to_display

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32  # image side of the tiny runs
STAGES = 3  # cifar_resnet20: layer1-layer3, each at its own size


def _train(out: Path, attention: str) -> Path:
    code = main(["train", "--dataset", "synthetic", "--image-size", str(SIZE), "--synthetic-train-size", "64",
                 "--synthetic-val-size", "16", "--epochs", "1", "--batch-size", "16", "--no-progress",
                 "--no-tensorboard", "--device", "cpu", "--attention", attention, "--output", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single_thread) -> dict[str, Path]:
    """A tiny CBAM run and a tiny plain run of cifar_resnet20 on 32 x 32 synthetic images, trained once."""
    root = tmp_path_factory.mktemp("viz-runs")
    return {name: _train(root / name, name) for name in ("cbam", "none")}


@pytest.fixture(scope="module")
def shown(runs, tmp_path_factory) -> dict:
    """visualize with compare and score, over the 16 validation images of the run."""
    out = tmp_path_factory.mktemp("viz-out") / "pictures"
    return visualize(runs["cbam"], output=out, compare=runs["none"], num_images=2, score=True, score_images=64,
                     batch_size=8, progress=False)


def _png(path: str | Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def _not_blank(image: Image.Image) -> bool:
    return float(np.asarray(image.convert("L"), dtype=np.float32).std()) > 10


def _one_error_line(capsys, command: str = "visualize") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cbam {command}: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------ pictures and score
def test_one_picture_per_image_of_the_expected_size(shown):
    out = Path(shown["output"])
    assert shown["pictures"] == [str(out / "image_000.png"), str(out / "image_001.png")]
    panels = 1 + STAGES + 2  # input, spatial attention per stage, Grad-CAM of both networks
    for path in shown["pictures"]:
        image = _png(path)
        assert image.size == (round(panels * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI))
        assert _not_blank(image)
    assert sorted(p.name for p in out.iterdir()) == ["channel_gates.png", "image_000.png", "image_001.png",
                                                      "score.json"]
    assert sorted(shown["files"]) == sorted(str(p) for p in out.iterdir())


def test_channel_gate_figure(shown):
    image = _png(shown["channel_gates"])
    assert image.size == (round(STAGES * CHANNEL_INCHES[0] * DPI), round(CHANNEL_INCHES[1] * DPI))
    assert _not_blank(image)


def test_score_json_is_sane(shown, runs):
    data = json.loads(Path(shown["score_json"]).read_text())
    assert data["images"] == 16  # all the validation set holds, although 64 were asked for
    cfg, _, _ = load_run(runs["cbam"])
    _, val, _ = datasets_for(cfg)
    boxes = val.boxes
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean().item() / SIZE**2
    assert data["chance"] == pytest.approx(100 * area, abs=1e-3)
    maps = [(r["map"], r["model"]) for r in data["rows"]]
    assert maps == [("spatial layer1", "cifar_resnet20/cbam"), ("spatial layer2", "cifar_resnet20/cbam"),
                    ("spatial layer3", "cifar_resnet20/cbam"), ("grad-cam layer3", "cifar_resnet20/cbam"),
                    ("grad-cam layer3", "cifar_resnet20/none")]
    for row in data["rows"]:
        assert row["images"] == 16 and row["chance"] == data["chance"]
        assert 0 <= row["mass_in_box"] <= 100
        assert (row["pointing_game"] * 16 / 100) == pytest.approx(round(row["pointing_game"] * 16 / 100))
    assert shown["score"] == data["rows"]
    assert "pointing game %" in shown["table"].splitlines()[0]


def test_a_folder_of_images(runs, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), mode="L").save(folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    result = visualize(runs["cbam"], output=tmp_path / "out", images=folder, progress=False)
    assert [Path(p).name for p in result["pictures"]] == ["image_000.png", "image_001.png"]
    assert result["score"] is None and result["score_json"] is None
    image = _png(result["pictures"][0])
    assert image.size == (round((1 + STAGES + 1) * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI))


def test_grey_images_are_drawn(tmp_path):
    grey = to_display(torch.randn(1, 16, 16), (0.5,), (0.25,))
    assert grey.shape == (16, 16) and 0 <= grey.min() and grey.max() <= 1
    assert to_display(torch.randn(3, 16, 16), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)).shape == (16, 16, 3)
    fig = image_figure(grey, [Panel("input"), Panel("heat", np.random.default_rng(0).random((16, 16)))],
                       box=(2, 3, 9, 12))
    image = _png(save_png(fig, tmp_path / "grey.png"))
    assert image.size == (round(2 * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI)) and _not_blank(image)


def test_the_command_prints_where_and_the_score(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["visualize", "--checkpoint", str(runs["cbam"]), "--output", str(out), "--num-images", "1",
                 "--score", "--score-images", "8", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert str(out) in text and "pointing game %" in text and "score.json" in text
    assert json.loads((out / "score.json").read_text())["images"] == 8


# ------------------------------------------------------------------------------------------ parts
def test_grad_cam_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = cbam.create_model("cifar_resnet20", attention="cbam", num_classes=4).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    maps = grad_cam(model, x)
    assert maps.shape == (2, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_gradcam_layer_of_package_and_other_networks():
    model = cbam.create_model("cifar_resnet20", attention="cbam", num_classes=4)
    assert gradcam_layer(model, torch.randn(1, 3, SIZE, SIZE))[0] == "layer3"
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    name, layer = gradcam_layer(other, torch.randn(1, 3, 8, 8))
    assert name == "1" and layer is other[1]
    assert not any(m._forward_hooks for m in other.modules())
    with pytest.raises(ValueError, match="no layer for Grad-CAM"):
        gradcam_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_stages_group_consecutive_modules_of_one_size():
    rec = Recording(paths=["layer1.0.attn", "layer1.1.attn", "layer2.0.attn", "head.attn"])
    rec.spatial = {"layer1.0.attn": torch.zeros(1, 1, 8, 8), "layer1.1.attn": torch.zeros(1, 1, 8, 8),
                   "layer2.0.attn": torch.zeros(1, 1, 4, 4)}
    stages = attention_stages(rec)
    assert [(s.name, s.paths) for s in stages] == [("layer1", ("layer1.0.attn", "layer1.1.attn")),
                                                   ("layer2.0.attn", ("layer2.0.attn",)),
                                                   ("head.attn", ("head.attn",))]


# ------------------------------------------------------------------------------------------ bad input
def test_bad_checkpoint_file(runs, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    assert main(["visualize", "--checkpoint", str(garbage), "--output", str(tmp_path / "o")]) == 2
    assert str(garbage) in _one_error_line(capsys)


def test_folder_without_images(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    code = main(["visualize", "--checkpoint", str(runs["cbam"]), "--images", str(tmp_path / "empty"),
                 "--output", str(tmp_path / "o")])
    assert code == 2
    assert "no image files" in _one_error_line(capsys)
    with pytest.raises(ValueError, match="does not exist"):
        visualize(runs["cbam"], output=tmp_path / "o", images=tmp_path / "missing", progress=False)


def test_a_network_without_cbam_modules(runs, tmp_path, capsys):
    code = main(["visualize", "--checkpoint", str(runs["none"]), "--output", str(tmp_path / "o")])
    assert code == 2
    line = _one_error_line(capsys)
    assert "no CBAM module" in line and "compare" in line


def test_score_needs_boxes(runs, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    code = main(["visualize", "--checkpoint", str(runs["cbam"]), "--images", str(tmp_path / "imgs"), "--score",
                 "--output", str(tmp_path / "o")])
    assert code == 2
    assert "boxes" in _one_error_line(capsys)


def test_missing_grad_cam_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(ValueError, match=r"pip install 'cbam\[viz\]'"):
        visualize(tmp_path / "run", output=tmp_path / "o", progress=False)
    assert main(["visualize", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "o")]) == 2
    assert "pip install 'cbam[viz]'" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_other_bad_arguments(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        visualize(runs["cbam"], output=tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match="not both"):
        visualize(runs["cbam"], output=tmp_path / "o", images=tmp_path, dataset="synthetic", progress=False)
    with pytest.raises(ValueError, match="num_images must be an integer >= 1"):
        visualize(runs["cbam"], output=tmp_path / "o", num_images=0, progress=False)
    assert main(["visualize", "--checkpoint", str(runs["cbam"]), "--images", str(tmp_path), "--dataset",
                 "synthetic", "--output", str(tmp_path / "o")]) == 2
    _one_error_line(capsys)


def test_compare_runs_must_have_seen_the_same_images():
    from cbam.train.config import TrainConfig
    from cbam.viz.visualize import _check_same_data

    digits = TrainConfig(dataset="cluttered-digits")
    _check_same_data(digits, TrainConfig(dataset="cluttered-digits", image_size=48), Path("plain"))  # unset = 48
    for other, word in ((TrainConfig(dataset="cluttered-digits", clutter=2), "clutter 2"),
                        (TrainConfig(dataset="cluttered-digits", synthetic_seed=1), "synthetic_seed 1"),
                        (TrainConfig(dataset="cluttered-digits", image_size=64), "image_size 64"),
                        (TrainConfig(dataset="synthetic"), "dataset 'synthetic'")):
        with pytest.raises(ValueError, match="compare run plain was trained on other data") as info:
            _check_same_data(digits, other, Path("plain"))
        assert word.split()[0] in str(info.value) and "\n" not in str(info.value)
