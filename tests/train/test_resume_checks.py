"""--resume checks the run: settings that define it are refused when they differ, the others are applied and logged,
config.yaml tells the truth; a folder without a checkpoint is no run to protect. Real ``python -m cbam`` processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cbam.train.config import MAY_CHANGE, NOT_COMPARED, RUN_DEFINING, TrainConfig, check_resume, resume_changes

TINY = [
    "--dataset", "synthetic", "--model", "cifar_resnet20", "--attention", "cbam", "--image-size", "32",
    "--synthetic-train-size", "32", "--synthetic-val-size", "16", "--batch-size", "16", "--lr", "0.05",
    "--no-progress", "--workers", "0", "--no-tensorboard", "--schedule", "step",
]
ENV = {**os.environ, "CBAM_MALLOC": "default"}


def cbam(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cbam", *argv], capture_output=True, text=True, env=ENV,
                          timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    done = cbam("train", *TINY, "--epochs", "1", "--output", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_another_arrangement_is_refused_naming_the_setting(run):
    before = snapshot(run)
    line = one_error_line(cbam("train", *TINY, "--epochs", "2", "--output", str(run), "--resume",
                               "--arrangement", "parallel"))
    assert line.startswith("cbam train: error: --resume:") and "arrangement: stored None, given 'parallel'" in line
    assert snapshot(run) == before  # config.yaml, metrics and checkpoints untouched


def test_lr_and_batch_size_on_resume_are_refused_and_config_yaml_keeps_the_truth(run):
    before = snapshot(run)
    line = one_error_line(cbam("train", "--resume", "--output", str(run), "--lr", "0.5", "--batch-size", "32"))
    assert "lr: stored 0.05, given 0.5" in line and "batch_size: stored 16, given 32" in line
    assert snapshot(run) == before
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.05


def test_allowed_changes_are_applied_logged_and_written(run):
    done = cbam("train", "--resume", "--output", str(run), "--epochs", "2", "--save-every-steps", "1")
    assert done.returncode == 0, done.stderr
    assert "resume: changed settings applied" in done.stdout
    assert "epochs: stored 1, given 2" in done.stdout and "save_every_steps: stored 0, given 1" in done.stdout
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert (stored["epochs"], stored["save_every_steps"], stored["lr"], stored["attention"]) == (2, 1, 0.05, "cbam")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_checkpoint_is_compared_when_config_yaml_is_gone(run):
    from cbam.cli import main

    (run / "config.yaml").unlink()
    # without config.yaml nothing is stored to start from: the full command is given, with another lr
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(["train", *TINY, "--epochs", "2", "--output", str(run), "--resume", "--lr", "0.5"]))
    assert info.value.code == 2


def test_without_config_yaml_the_checkpoint_is_compared_in_a_real_process(run):
    (run / "config.yaml").unlink()
    line = one_error_line(cbam("train", *TINY, "--epochs", "2", "--output", str(run), "--resume",
                               "--max-steps-per-epoch", "1"))
    assert "max_steps_per_epoch: stored None, given 1" in line and "last.pt" in line


@pytest.mark.slow  # subprocess runs: CI's slow phase
def test_a_failed_start_is_retried_and_resume_says_what_to_do(tmp_path):
    out = tmp_path / "run"
    diverged = cbam("train", *TINY, "--lr", "1e30", "--epochs", "1", "--output", str(out))
    assert diverged.returncode == 3, diverged.stderr
    assert (out / "config.yaml").exists() and not list((out / "checkpoints").glob("*.pt"))
    line = one_error_line(cbam("train", *TINY, "--epochs", "1", "--output", str(out), "--resume"))
    assert "no checkpoint to resume" in line and "without --resume" in line
    retry = cbam("train", *TINY, "--epochs", "1", "--output", str(out))
    assert retry.returncode == 0, retry.stderr
    assert "starting it over" in retry.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.05
    assert (out / "checkpoints" / "last.pt").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # now it is a run: the same command is refused
    assert "already holds a run" in one_error_line(cbam("train", *TINY, "--epochs", "1", "--output", str(out)))


# ------------------------------------------------------------------------------------------ the split, in the library
def test_every_setting_is_either_run_defining_may_change_or_not_compared():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RUN_DEFINING) | set(MAY_CHANGE) | set(NOT_COMPARED) == names
    assert not set(RUN_DEFINING) & set(MAY_CHANGE)
    for key in ("model", "attention", "arrangement", "preset", "reduction", "kernel_size", "pool_types", "dataset",
                "batch_size", "lr", "momentum", "weight_decay", "schedule", "step_size", "gamma", "seed", "amp",
                "accum_steps", "label_smoothing", "warmup_epochs", "max_steps_per_epoch"):
        assert key in RUN_DEFINING, key
    for key in ("epochs", "workers", "progress", "save_every_steps", "tensorboard", "device", "fuse", "compile"):
        assert key in MAY_CHANGE, key


def test_resume_changes_splits_and_names_values():
    stored = {k: v for k, v in dataclasses.asdict(TrainConfig(schedule="step")).items()}
    refused, allowed = resume_changes(stored, TrainConfig(schedule="step", lr=0.5, epochs=100, workers=2))
    assert refused == ["lr: stored 0.1, given 0.5"]
    assert allowed == ["workers: stored None, given 2", "epochs: stored 90, given 100"]
    with pytest.raises(ValueError, match="lr: stored 0.1, given 0.5") as info:
        check_resume(stored, TrainConfig(lr=0.5), "somewhere")
    assert "\n" not in str(info.value)
    # under the cosine schedule the number of epochs shapes the curve: it defines the run
    cosine = {**stored, "schedule": "cosine"}
    refused, _ = resume_changes(cosine, TrainConfig(schedule="cosine", epochs=100))
    assert refused == ["epochs: stored 90, given 100"]
    # keys an older run did not store count as their defaults
    assert resume_changes({}, TrainConfig(attention_init="paper")) == ([], [])
    # except attention_init: runs from before it existed used the modules' own initialisation
    assert resume_changes({}, TrainConfig())[0] == ["attention_init: stored 'paper', given 'identity'"]


def test_fewer_epochs_than_already_trained_is_refused(run, capsys):
    from cbam.cli import main

    assert main(["train", "--resume", "--output", str(run), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--output", str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epochs 1 is fewer than the 2" in err[0], err
