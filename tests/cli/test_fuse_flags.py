"""``--no-fuse`` / ``--memory-efficient`` reach the training engine and the bench; the allocator settings."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import cbam.bench.runner as runner
import cbam.cli.bench as cli_bench
import cbam.train.engine as engine
from cbam.cli import main
from cbam.cli.runtime import TUNED_ENV, allocator_env, allocator_setting
from cbam.train.config import TrainConfig

TINY = ["--dataset", "synthetic", "--model", "cifar_resnet20", "--attention", "cbam", "--image-size", "32",
        "--synthetic-train-size", "32", "--synthetic-val-size", "16", "--batch-size", "16", "--epochs", "1",
        "--no-progress", "--workers", "0", "--no-tensorboard"]


@pytest.mark.parametrize("flags, fused", [([], True), (["--no-fuse"], False)])
def test_train_fuses_on_the_cpu_unless_told_not_to(tmp_path, capsys, flags, fused):
    out = tmp_path / "run"
    assert main(["train", *TINY, *flags, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["fuse"] is fused
    if fused:
        assert "fused " in printed and "block(s) with cbam.fuse" in printed
    else:
        assert "fusion off (fuse: false)" in printed


def test_engine_calls_fuse_with_the_memory_setting(tmp_path, monkeypatch):
    calls = []

    def spy(model, *, memory_efficient=False):
        calls.append(memory_efficient)
        return ["layer1.0"]

    monkeypatch.setattr(engine, "fuse", spy)
    cfg = TrainConfig(model="cifar_resnet20", attention="cbam", image_size=32, synthetic_train_size=16,
                      synthetic_val_size=16, batch_size=16, epochs=1, output=str(tmp_path / "run"), progress=False,
                      workers=0, tensorboard=False, memory_efficient=True)
    engine.train(cfg)
    assert calls == [True]


@pytest.mark.parametrize(
    "fuse, memory_efficient, device, wanted",
    [
        (True, False, "cpu", True),
        (False, False, "cpu", False),
        (True, False, "cuda", False),  # the fused kernels are CPU kernels
        (True, True, "cuda", True),  # activation recomputation saves memory anywhere
        (False, True, "cuda", False),
    ],
)
def test_when_fusion_applies(fuse, memory_efficient, device, wanted):
    cfg = TrainConfig(fuse=fuse, memory_efficient=memory_efficient)
    assert engine.fuse_wanted(cfg, torch.device(device)) is wanted


@pytest.mark.parametrize("flags, fuse", [([], True), (["--no-fuse"], False)])
def test_bench_passes_no_fuse_and_the_allocator_setting(tmp_path, monkeypatch, flags, fuse):
    seen = {}

    def fake_run_benchmark(**kwargs):
        seen.update(kwargs)
        return {"stub": True}

    monkeypatch.setattr(cli_bench, "run_benchmark", fake_run_benchmark)
    out = tmp_path / "worker.json"
    assert main(["bench", "--allocator", "current", *flags, "--worker-json", str(out)]) == 0
    assert seen["fuse"] is fuse and seen["allocator"] == allocator_setting()
    assert json.loads(out.read_text()) == {"stub": True}


def test_allocator_settings_live_with_the_command_line():
    assert not hasattr(runner, "TUNED_ENV") and not hasattr(runner, "allocator_setting")
    assert allocator_setting(dict(TUNED_ENV)) == "tuned"
    assert allocator_setting({}) == "default"
    assert allocator_setting({"LD_PRELOAD": "libjemalloc.so"}) == "custom"
    tuned = allocator_env("tuned", {"PATH": "/bin"})
    assert allocator_setting(tuned) == "tuned" and tuned["CBAM_MALLOC"] == "as-is" and tuned["PATH"] == "/bin"
    assert allocator_setting(allocator_env("default", {**TUNED_ENV})) == "default"
