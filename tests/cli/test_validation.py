"""Validation before work: every bad value is one line and exit code 2 from a real ``python -m cbam`` process, before
anything starts (no output folder made, no torchrun worker started); the library raises ValueError naming the
choices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cbam.models import create_model
from cbam.train.config import TrainConfig, available_devices

ENV = {**os.environ, "CBAM_MALLOC": "default"}
TINY = ["--synthetic-train-size", "32", "--synthetic-val-size", "16", "--batch-size", "16", "--epochs", "1",
        "--no-progress", "--no-tensorboard"]


def cbam(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cbam", *argv], capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=cwd)


def one_error_line(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"cbam {command}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "yaml_text, words",
    [("attention: eca\n", "unknown attention 'eca'; expected one of none, se, cbam, bam"),
     ("preset: foo\nattention: cbam\n", "unknown preset 'foo'; expected one of paper, seed, timm, ultralytics"),
     ("arrangement: diagonal\nattention: cbam\n", "expected one of channel_first, spatial_first, parallel")],
)
def test_bad_yaml_choices(tmp_path, yaml_text, words):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    line = one_error_line(cbam("train", "--config", str(tmp_path / "bad.yaml"), *TINY, "--output",
                               str(tmp_path / "run")), "train")
    assert words in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, words",
    [(["--step-size", "0"], "step_size must be at least 1, got 0"),
     (["--label-smoothing", "2"], "label_smoothing must be a finite number >= 0 and <= 1, got 2.0"),
     (["--momentum", "-1"], "momentum must be a finite number >= 0 and <= 1, got -1.0"),
     (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0, got -1.0"),
     (["--max-steps-per-epoch", "-2"], "max_steps_per_epoch must be at least 1 (or unset), got -2"),
     (["--lr", "nan"], "lr must be a finite number > 0, got nan")],
)
def test_numeric_ranges_are_refused_before_anything_starts(tmp_path, flags, words):
    line = one_error_line(cbam("train", *TINY, *flags, "--output", str(tmp_path / "run")), "train")
    assert words in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["foo", "cuda:7" if "cuda" in available_devices() else "cuda"])
def test_devices_that_do_not_exist_name_those_that_do(tmp_path, device):
    line = one_error_line(cbam("train", *TINY, "--device", device, "--output", str(tmp_path / "run")), "train")
    assert f"device {device!r} is not available here; devices that exist: {', '.join(available_devices())}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "demo"])
def test_output_under_a_file(tmp_path, command):
    (tmp_path / "afile").write_text("not a folder")
    extra = TINY if command == "train" else ["--epochs", "1", "--no-progress"]
    line = one_error_line(cbam(command, *extra, "--output", str(tmp_path / "afile" / "sub")), command)
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line


def test_bad_input_under_the_launcher_is_checked_once_before_any_worker(tmp_path):
    done = cbam("train", *TINY, "--nproc-per-node", "2", "--momentum", "-1", "--output", str(tmp_path / "run"))
    line = one_error_line(done, "train")
    assert "momentum must be" in line
    assert "launching" not in done.stdout and "torch.distributed" not in done.stderr
    assert not (tmp_path / "run").exists()
    # a folder that already holds a run is refused there too, once
    (tmp_path / "afile").write_text("")
    done = cbam("train", *TINY, "--nproc-per-node", "2", "--output", str(tmp_path / "afile" / "x"))
    assert "is a file, not a folder" in one_error_line(done, "train") and "launching" not in done.stdout


def test_the_library_raises_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'x'; expected one of 'paper', 'seed', 'timm', 'ultralytics'"):
        create_model("cifar_resnet20", attention="cbam", preset="x")
    for kwargs, words in [({"attention": "eca"}, "expected one of none, se, cbam, bam"),
                          ({"preset": "foo", "attention": "cbam"}, "expected one of paper, seed, timm, ultralytics"),
                          ({"model": "resnet9000"}, "unknown model 'resnet9000'; expected one of"),
                          ({"nesterov": True, "momentum": 0.0}, "nesterov needs a momentum"),
                          ({"batch_size": 10, "accum_steps": 3}, "multiple of accum_steps"),
                          ({"resume": True, "overwrite": True}, "contradict"),
                          ({"widen": 2.0}, "attention option"),
                          ({"dataset": "cifar10"}, "needs a data folder")]:
        with pytest.raises(ValueError, match=words):
            TrainConfig(**kwargs).validate()


def test_eval_and_bench_outputs_under_a_file_are_refused(tmp_path, capsys):
    from cbam.cli import main

    (tmp_path / "afile").write_text("")
    bad = str(tmp_path / "afile" / "x.json")
    assert main(["bench", "--output", bad]) == 2
    assert main(["bench", "--device", "foo"]) == 2
    assert main(["bench", "--min-seconds", "-1"]) == 2
    assert main(["eval", "--checkpoint", str(tmp_path), "--output", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all("error:" in line for line in err), err
