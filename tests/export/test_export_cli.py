"""``cbam export`` in-process: a checked file and one line on success; exit code 2, one error line and nothing written
on a bad format, checkpoint, model, size or failed check."""

from __future__ import annotations

import pytest
import torch
from export_helpers import resnet18

import cbam
from cbam.cli import main
from cbam.export import core as export_core
from cbam.export import load_runner
from cbam.train.checkpoint import save_weights

ARGS = ["--model", "resnet18", "--attention", "cbam", "--num-classes", "10", "--image-size", "64"]


pytestmark = pytest.mark.usefixtures("single_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """ResNet-18 + CBAM with random BatchNorm statistics, saved as this package's safetensors."""
    model = resnet18()
    path = tmp_path_factory.mktemp("ckpt") / "resnet18_cbam.safetensors"
    save_weights(path, model, metadata={"model": "resnet18", "attention": "cbam"})
    return path, model


def _fails(capsys, argv, *expected):
    """Runs the command, which must fail with exit code 2 and exactly one line on stderr containing ``expected``."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbam export: error: "), captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert captured.out == ""


def _weights_match(run, model) -> None:
    """The file computes the checkpoint's model, which a freshly initialised one does not."""
    x = torch.randn(3, 3, 50, 70, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    fresh = cbam.create_model("resnet18", attention="cbam", num_classes=10).eval()
    with torch.no_grad():
        got = run(x)[0]
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, fresh(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("exported-program", marks=pytest.mark.slow)])
def test_export_writes_a_checked_file_and_one_line(fmt, checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    out = tmp_path / "sub" / f"resnet18.{fmt}"
    assert main(["export", str(ckpt), *ARGS, "--format", fmt, str(out)]) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.strip().splitlines()
    assert line.startswith(f"wrote {out} ({fmt}, ") and "batch 1, 2, 3 x 64x64 and 49x51 pixels" in line, line
    assert "max |difference|" in line and "<= 0.0001" in line
    run, ops = load_runner(fmt, out.read_bytes())
    _weights_match(run, model)  # the checkpoint's weights, not a fresh initialisation
    assert not any("cbam_cpu" in op for op in ops)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.mark.slow
def test_export_onnx(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    out = tmp_path / "resnet18.onnx"
    argv = ["export", str(ckpt), *ARGS, "--format", "onnx", "--batch-sizes", "1,4,7", "--check-size", "40x90", str(out)]
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "(onnx, opset 18, " in line and "ONNX Runtime matches the model at batch 1, 4, 7 x 64x64 and 40x90" in line
    run, ops = load_runner("onnx", out.read_bytes())
    _weights_match(run, model)
    assert {"ReduceMean", "ReduceMax"} <= ops and "GlobalAveragePool" not in ops


def test_a_failed_check_exits_2_and_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    """An artifact whose outputs are off (here: the reloaded graph's outputs nudged by 1e-3) fails the check: exit 2,
    one line, the old file kept and no temporary file left."""
    real = export_core.load_runner

    def off_by_a_little(fmt, data):
        run, ops = real(fmt, data)
        return (lambda x: [t + 1e-3 for t in run(x)]), ops

    monkeypatch.setattr(export_core, "load_runner", off_by_a_little)
    ckpt, _ = checkpoint
    out = tmp_path / "resnet18.pt"
    out.write_bytes(b"old")
    _fails(capsys, ["export", str(ckpt), *ARGS, "--format", "torchscript", str(out)],
           "torchscript export: the exported file differs from the model by up to", "expected at most 0.0001")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["resnet18.pt"]


@pytest.mark.slow
def test_an_exported_program_refused_at_the_check_size_writes_nothing(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = tmp_path / "r.pt2"
    _fails(capsys, ["export", str(ckpt), *ARGS, "--format", "exported-program", "--check-size", "32", str(out)],
           "the exported file fails at batch 1, 32x32 pixels: Guard failed")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
        (["--format", "onnx", "--model", "resnet19"], "unknown model 'resnet19'; did you mean resnet18"),
        (["--format", "onnx", "--num-classes", "7"], "fit resnet18"),
        (["--format", "onnx", "--attention", "se"], "resnet18"),
        (["--format", "onnx", "--image-size", "0"], "argument --image-size: expected H or HxW"),
        (["--format", "onnx", "--batch-sizes", "1,0"], "argument --batch-sizes: expected comma-separated integers"),
        (["--format", "onnx", "--tolerance", "-1"], "argument --tolerance: expected a finite number >= 0"),
        (["--format", "onnx", "--opset", "17"], "argument --opset: expected an integer >= 18"),
        ([], "the following arguments are required: --format"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(change, expected, checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = tmp_path / "m.onnx"
    argv = ["export", str(ckpt), *ARGS, *change, str(out)]
    _fails(capsys, argv, expected)
    assert not list(tmp_path.iterdir())


def test_bad_checkpoints_are_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    _fails(capsys, ["export", str(tmp_path / "missing.safetensors"), *ARGS, "--format", "onnx", str(out)],
           "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    _fails(capsys, ["export", str(garbage), *ARGS, "--format", "onnx", str(out)], "garbage.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.safetensors"]


def test_a_directory_as_out_is_refused(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    _fails(capsys, ["export", str(ckpt), *ARGS, "--format", "torchscript", str(tmp_path)], "is a directory")


def test_help_names_the_formats_and_the_check(capsys):
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("onnx", "torchscript", "exported-program", "--check-size", "--batch-sizes", "--tolerance", "pixels"):
        assert text in out, text
