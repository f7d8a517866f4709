"""Recipe tests: the real ``cbam train`` / ``cbam eval`` on tiny synthetic data, a few steps each."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbam.cli import main
from cbam.train.config import TrainConfig
from cbam.train.engine import Diverged, Interrupted, train

TINY = [
    "--dataset", "synthetic", "--model", "cifar_resnet20", "--image-size", "32",
    "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--batch-size", "16", "--lr", "0.05",
    "--no-progress", "--workers", "0",
]


def tiny_config(out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        model="cifar_resnet20", attention="cbam", dataset="synthetic", image_size=32, synthetic_train_size=64,
        synthetic_val_size=32, batch_size=16, lr=0.05, epochs=2, schedule="cosine", output=str(out),
        progress=False, workers=0, tensorboard=False,
    )
    return dataclasses.replace(base, **overrides)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_train_writes_every_output_and_lowers_the_loss(tmp_path):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--attention", "cbam", "--epochs", "3", "--output", str(out),
                 "--synthetic-train-size", "128"])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "top1_err", "top5_err", "lr", "seconds", "images_per_s"):
        assert all(key in r for r in rows), key
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_top1_err", "final_top5_err", "best_top1_err", "best_top5_err", "params", "gmacs",
                "wall_time_s", "model", "attention", "dataset"):
        assert key in summary, key
    assert summary["attention"] == "cbam" and summary["params"] > 0 and summary["gmacs"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reproduces_the_final_validation_numbers(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--attention", "cbam", "--epochs", "1", "--output", str(out)]) == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for target in (out, out / "model.safetensors", out / "checkpoints" / "last.pt"):
        result_file = tmp_path / "eval.json"
        assert main(["eval", "--checkpoint", str(target), "--output", str(result_file)]) == 0
        result = json.loads(result_file.read_text())
        for key in ("top1_err", "top5_err", "val_loss"):
            assert result[key] == pytest.approx(final[key], abs=1e-6), (target, key)
    assert "top-1 err" in capsys.readouterr().out
    # a typo in the workers would fork processes until memory runs out: refused in one line before any loader
    assert main(["eval", "--checkpoint", str(out), "--workers", "99999999999999999999"]) == 2
    err = capsys.readouterr().err
    assert "workers must be from 0 to" in err and len(err.strip().splitlines()) == 1


def test_resume_after_an_interruption_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(straight))

    interrupted = tmp_path / "interrupted"

    def stop_mid_epoch(state):
        if state["step"] == 6:  # epoch 2, batch 2 of 4: a real SIGTERM to this process
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        train(tiny_config(interrupted), on_step=stop_mid_epoch)
    assert info.value.exit_code == 128 + signal.SIGTERM
    saved = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)
    # the flag raised during step 6 is agreed on (all ranks) and acted on after step 7
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 3, 7)
    train(tiny_config(interrupted, resume=True))

    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = (straight / "metrics.jsonl").read_text().splitlines()
    rows_b = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b, strict=True):
        ra, rb = json.loads(ra), json.loads(rb)
        for key in ("train_loss", "val_loss", "top1_err", "top5_err", "lr"):
            assert ra[key] == rb[key], key


def test_sigterm_to_a_real_process_saves_and_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cbam", "train", *TINY, "--epochs", "500", "--save-every-steps", "1",
           "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "last.pt"
    try:
        import time

        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in 120 s"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM" in err and str(last) in err and "--resume" in err
    assert "Traceback" not in err
    state = torch.load(last, weights_only=True)
    assert state["step"] >= 1
    assert not list(last.parent.glob("*.tmp")), "a temporary file was left behind"


def test_corrupt_checkpoint_is_named_and_left_alone(tmp_path, capsys):
    out = tmp_path / "run"
    # the step schedule lets --resume add epochs (under cosine the epochs define the run)
    assert main(["train", *TINY, "--epochs", "1", "--schedule", "step", "--output", str(out)]) == 0
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    truncated = last.read_bytes()
    capsys.readouterr()
    code = main(["train", *TINY, "--epochs", "2", "--schedule", "step", "--output", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(last) in err and "corrupt or truncated" in err and len(err.strip().splitlines()) == 1
    assert last.read_bytes() == truncated  # nothing rewritten over it
    assert main(["eval", "--checkpoint", str(last)]) == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, save_every_steps=2, epochs=1)

    def poison(state):
        if state["step"] == 3:
            model_param = poison.model_param
            with torch.no_grad():
                model_param.fill_(float("nan"))

    import cbam.train.engine as engine

    original = engine.build_model

    def capture(*args, **kwargs):
        model = original(*args, **kwargs)
        if not hasattr(poison, "model_param"):
            poison.model_param = next(model.parameters())
        return model

    engine.build_model = capture
    try:
        with pytest.raises(Diverged, match=r"step 4\)") as info:
            train(cfg, on_step=poison)
    finally:
        engine.build_model = original
    last = out / "checkpoints" / "last.pt"
    assert str(last) in str(info.value)
    state = torch.load(last, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--dataset", "imagenet22k"], "invalid choice"),
        (["--attention", "eca"], "invalid choice"),
        (["--config", "imagenet1k"], "neither a recipe"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--batch-size", "4096"], "batch size 4096 is larger than the 64 training images"),
        (["--epochs", "0"], "epochs must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        code = main(["train", *TINY, "--epochs", "1", "--output", str(tmp_path / "run"), *argv])
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_output_folder_of_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out), "--overwrite"]) == 0


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--output", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


@pytest.mark.compiler
@pytest.mark.slow  # subprocess runs: CI's slow phase
def test_amp_channels_last_and_compile_together(tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(out, epochs=1, amp="bf16", channels_last=True, compile=True,
                                synthetic_train_size=32, synthetic_val_size=16))
    assert summary["final_top1_err"] is not None


def test_grey_scale_data_runs_through_in_chans(tmp_path, fake_mnist):
    fake_mnist(tmp_path / "data", "MNIST", n_train=32, n_test=8)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--model", "cifar_resnet20",
            "--attention", "cbam", "--batch-size", "16", "--epochs", "1", "--no-progress", "--workers", "0",
            "--output", str(out)]
    assert main(argv) == 0
    assert weights(out)["conv1.weight"].shape[1] == 1  # a one-channel stem, no replication


def test_recipes_are_valid_and_start_with_their_command():
    from cbam.train.config import RECIPES, load_yaml, recipe_path

    for name in RECIPES:
        first = recipe_path(name).read_text().splitlines()[0]
        assert first.startswith(f"# cbam train --config {name}"), first
        assert load_yaml(name)
    cfg = load_yaml("imagenet")
    assert (cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["batch_size"], cfg["epochs"], cfg["step_size"],
            cfg["gamma"]) == (0.1, 0.9, 1e-4, 256, 90, 30, 0.1)


def test_yaml_config_and_flags_agree_and_flags_win(tmp_path):
    from cbam.train.config import resolve

    path = tmp_path / "mine.yaml"
    path.write_text("model: resnet18_cifar\nattention: cbam\nreduction: 8\nepochs: 7\nlr: 1\n")
    cfg = resolve({"config": str(path), "epochs": 2})
    assert (cfg.model, cfg.attention, cfg.reduction, cfg.epochs, cfg.lr) == ("resnet18_cifar", "cbam", 8, 2, 1.0)
    path.write_text("epochs: seven\n")
    with pytest.raises(ValueError, match="epochs expects int"):
        resolve({"config": str(path)})
    path.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        resolve({"config": str(path)})


def test_demo_and_ablate_print_tables(tmp_path, capsys):
    small = ["--dataset", "synthetic", "--batch-size", "16", "--no-progress", "--workers", "0"]
    sizes = ["--config", str(tmp_path / "tiny.yaml")]
    (tmp_path / "tiny.yaml").write_text("model: cifar_resnet20\ndataset: synthetic\nimage_size: 32\n"
                                        "synthetic_train_size: 32\nsynthetic_val_size: 16\nepochs: 1\n"
                                        "lr: 0.05\nschedule: cosine\ntensorboard: false\n")
    assert main(["demo", *sizes, *small, "--seeds", "0", "--pictures", "0", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet20 + CBAM" in out and "cifar_resnet20 + SE" in out and "GMACs" in out
    assert "1 seed(s) per network" in out and "chance is 90.0 % top-1 error" in out
    assert "not judged: one seed measures no spread" in out
    assert "train images/s: measured side by side" in out
    for name in ("plain", "se", "cbam"):
        assert (tmp_path / "demo" / name / "summary.json").exists()
    assert (tmp_path / "demo" / "results.md").exists()

    assert main(["ablate", *sizes, *small, "--budget", "1", "--tables", "3", "--seeds", "0,1",
                 "--output", str(tmp_path / "ablate")]) == 0
    out = capsys.readouterr().out
    assert "Table 3" in out and "spatial + channel" in out and "±" in out
    rows = json.loads((tmp_path / "ablate" / "results.json").read_text())
    assert {r["variant"] for r in rows} == {"se", "cbam", "spatial_first", "parallel"}
    assert all(r["seeds"] == 2 for r in rows)


def test_every_ablation_variant_builds():
    from cbam.train.compare import TABLES, VARIANTS
    from cbam.train.engine import build_model

    assert {k for _, keys in TABLES.values() for k in keys} == set(VARIANTS)
    for key, (_, overrides) in VARIANTS.items():
        model = build_model(dataclasses.replace(TrainConfig(), **overrides), 10, 3)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10), key


def test_ablate_bad_budget(capsys):
    assert main(["ablate", "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_resume_with_another_model_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--output", str(out), "--resume", "--attention", "cbam"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and len(err.strip().splitlines()) == 1


def test_a_failed_start_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--model", "resnet9000", "--output", str(out)]) == 2
    assert not out.exists()
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
