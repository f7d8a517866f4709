"""The learning-rate schedule is set at every optimizer step; cosine anneals to zero at the run's end whatever the
number of epochs, with a default warm-up of 5 % of the run; the paper's step schedule stays available."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cbam.train.config import TrainConfig, resolve
from cbam.train.engine import lr_factor, make_scheduler, train, warmup_steps

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("epochs", [1, 3, 90])
def test_cosine_anneals_within_the_run_whatever_the_epochs(epochs):
    cfg = TrainConfig(epochs=epochs)
    assert cfg.schedule == "cosine" and cfg.warmup_epochs is None
    steps = 100
    total = epochs * steps
    warm = warmup_steps(cfg, steps)
    assert warm == round(0.05 * total)
    factors = [lr_factor(cfg, s, steps) for s in range(total)]
    if warm:
        assert factors[0] == pytest.approx(0.1) and factors[warm] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(factors[warm:], factors[warm + 1:], strict=False))
    assert factors[-1] < 0.001  # the last step is nearly at zero, not at half the rate
    # the hand-computed middle of the annealing
    mid = warm + (total - warm) // 2
    assert lr_factor(cfg, mid, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - warm) / (total - warm))))


def test_step_schedule_is_the_papers_and_warmup_can_be_given_in_epochs():
    cfg = TrainConfig(schedule="step", step_size=30, gamma=0.1, epochs=90)
    assert warmup_steps(cfg, 100) == 0
    assert lr_factor(cfg, 0, 100) == 1.0 and lr_factor(cfg, 2999, 100) == 1.0
    assert lr_factor(cfg, 3000, 100) == pytest.approx(0.1) and lr_factor(cfg, 6000, 100) == pytest.approx(0.01)
    warm = TrainConfig(schedule="constant", warmup_epochs=0.5, epochs=2)
    assert warmup_steps(warm, 10) == 5
    assert [round(lr_factor(warm, s, 10), 3) for s in (0, 1, 5, 19)] == [0.1, 0.28, 1.0, 1.0]


def test_scheduler_sets_the_optimizer_rate_per_step():
    cfg = TrainConfig(epochs=2, lr=0.2, warmup_epochs=0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = make_scheduler(cfg, opt, steps_per_epoch=4)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.2) and seen[-1] < 0.01
    assert seen == sorted(seen, reverse=True)


def test_recipes_keep_their_schedules():
    assert resolve({"config": "imagenet", "data_dir": "/tmp"}).schedule == "step"
    imagenet = resolve({"config": "imagenet", "data_dir": "/tmp"})
    assert (imagenet.warmup_epochs, imagenet.attention_init) == (0, "paper")
    demo = resolve({"config": "demo"})
    assert demo.schedule == "cosine" and demo.warmup_epochs is None


@pytest.mark.parametrize("value", [-1.0, float("nan"), 5.0])
def test_bad_warmup_is_one_line(value):
    with pytest.raises(ValueError, match="warmup_epochs"):
        resolve({"warmup_epochs": value, "epochs": 3})


def test_a_short_run_logs_a_falling_rate(tmp_path):
    cfg = TrainConfig(dataset="synthetic", image_size=32, synthetic_train_size=64, synthetic_val_size=16,
                      batch_size=16, epochs=2, lr=0.1, progress=False, tensorboard=False, workers=0,
                      output=str(tmp_path / "run"))
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 4 steps per epoch, 8 in all, warm-up round(0.4) = 0 steps: the last epoch ends at the last step's rate
    assert rows[0]["lr"] == pytest.approx(0.1 * lr_factor(cfg, 3, 4))
    assert rows[1]["lr"] == pytest.approx(0.1 * lr_factor(cfg, 7, 4)) and rows[1]["lr"] < 0.005
