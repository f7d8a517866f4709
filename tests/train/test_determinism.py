"""Deterministic training: the list of nondeterministic CUDA operators is complete against PyTorch's own docstring and
names real operators; no registered network with CBAM calls one in a training step (an adaptive max pool does, so the
test can fail); and training twice from the same seed with the deterministic flag gives bit-identical weights."""

from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import cbam
from cbam.cli import main
from cbam.fused import native
from cbam.layers import reference_only
from cbam.models import list_models, model_meta
from cbam.train import engine
from cbam.train.determinism import (
    CUDNN_CONVOLUTION,
    NONDETERMINISTIC,
    REVIEWED_DETERMINISTIC,
    OpRecorder,
    deterministic,
    nondeterministic_ops,
    record_step,
)

SLOW = {"resnet101", "resnet101_cifar", "resnet152", "resnext101_32x4d"}  # about 1 s each, 10 s on a busy machine


pytestmark = pytest.mark.usefixtures("single_thread")  # see tests/conftest.py


def _aten(name: str):
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op)


# ------------------------------------------------------------------------------------------------------- the list
def test_every_listed_operator_exists_in_this_torch():
    for entry in NONDETERMINISTIC:
        assert entry.with_flag in ("raises", "deterministic") and set(entry.devices) <= {"cpu", "cuda"}, entry
        assert isinstance(_aten(entry.op), torch._ops.OpOverloadPacket), entry.op
        assert entry.reason and entry.api
    for name in (*CUDNN_CONVOLUTION, *REVIEWED_DETERMINISTIC):
        assert isinstance(_aten(name), torch._ops.OpOverloadPacket), name


def test_the_list_covers_every_item_of_torch_docstring():
    """Each API ``torch.use_deterministic_algorithms`` names is attributed to an operator here (or to cuDNN)."""
    doc = torch.use_deterministic_algorithms.__doc__
    refs = re.findall(r":(?:class|func):`(torch\.[^`]+)`", doc)  # not RuntimeError or bool
    names = {ref.rsplit(".", 1)[-1] for ref in refs}
    names -= {"set_deterministic_debug_mode"}  # the note's pointer to the other interface
    assert {"AdaptiveMaxPool2d", "scatter_add_", "index_add", "interpolate"} <= names
    texts = [e.api + " " + e.reason for e in NONDETERMINISTIC] + list(CUDNN_CONVOLUTION.values())
    texts += list(REVIEWED_DETERMINISTIC.values())
    missing = sorted(n for n in names if not any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", t) for t in texts))
    assert not missing, f"in torch's docstring but not attributed here: {missing}"


def test_max_pool2d_backward_was_reviewed_and_is_not_on_the_list():
    assert "aten::max_pool2d_with_indices_backward" not in {e.op for e in NONDETERMINISTIC}
    assert "DilatedMaxPool2d.cu" in REVIEWED_DETERMINISTIC["aten::max_pool2d_with_indices_backward"]
    assert "aten::adaptive_max_pool2d_backward" in nondeterministic_ops("cuda", "raises")
    assert "aten::max_pool3d_with_indices_backward" in nondeterministic_ops("cuda", "deterministic")
    assert not set(REVIEWED_DETERMINISTIC) & set(nondeterministic_ops("cuda"))


# ------------------------------------------------------------------------------------------------- the recorder
def _cross_entropy_step(module: nn.Module, x: torch.Tensor) -> list[str]:
    record = record_step(module, x, torch.zeros(x.shape[0], dtype=torch.long),
                         loss_fn=lambda out, y: F.cross_entropy(out.flatten(1), y))
    return [f.op for f in record.flagged]


def test_an_adaptive_max_pool_is_flagged_and_a_plain_max_pool_is_not():
    x = torch.randn(2, 3, 12, 12)
    conv = nn.Conv2d(3, 4, 3)

    def step(*layers: nn.Module) -> list[str]:
        return _cross_entropy_step(nn.Sequential(conv, *layers), x)

    assert step(nn.AdaptiveMaxPool2d(1)) == ["aten::adaptive_max_pool2d_backward"]
    assert step(nn.AdaptiveAvgPool2d(2)) == ["aten::_adaptive_avg_pool2d_backward"]
    assert step(nn.AdaptiveAvgPool2d(1)) == []  # PyTorch computes a 1 x 1 output as a mean
    assert step(nn.MaxPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1)) == []


def test_conditions_select_the_calls_concerned():
    x = torch.randn(5, 4, requires_grad=True)
    index = torch.tensor([0, 2, 2])
    recorder = OpRecorder()
    with recorder:
        torch.gather(x, 0, index[:, None].expand(3, 4)).sum().backward()  # backward: scatter_add
        torch.zeros(5).index_put_((index,), torch.ones(3), accumulate=True)  # deterministic on CUDA
        torch.zeros(5).index_put_((index,), torch.ones(3))  # last write wins
        torch.arange(5).cumsum(0)  # integers: exact
    flagged = {(f.op, f.entry.with_flag) for f in recorder.findings()}
    assert flagged == {("aten::gather", "deterministic"), ("aten::scatter_add", "deterministic"),
                       ("aten::index_put_", "deterministic")}
    recorder = OpRecorder("cpu")
    with recorder:
        torch.zeros(5).index_put_((index,), torch.ones(3), accumulate=True)  # parallel accumulation on the CPU
    assert [f.entry.when for f in recorder.findings()] == ["accumulate=True, CPU tensors"]


def _network_step(name: str, reference: bool = True):
    """(model, record) of one SGD step of ``name`` with CBAM, 32 x 32 (CIFAR models) or 64 x 64 images, batch 2."""
    size = 32 if model_meta(name)["input_size"] == 32 else 64
    torch.manual_seed(0)
    model = cbam.create_model(name, attention="cbam", num_classes=5)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 4])
    with reference_only() if reference else contextlib.nullcontext():
        return model, record_step(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()])
def test_a_training_step_of_each_network_calls_nothing_on_the_list(name):
    """CBAM's reference path, which CUDA computes (the CPU kernels are CPU-only)."""
    model, record = _network_step(name)
    assert record.flagged == ()
    assert {"aten::convolution_backward", "aten::amax", "aten::sigmoid", "aten::nll_loss_backward"} <= set(record.calls)
    assert record.cudnn == ("aten::convolution", "aten::convolution_backward")
    assert record.other == ()
    has_max_pool = any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # the ImageNet ResNets' stem
    assert ("aten::max_pool2d_with_indices_backward" in record.reviewed) == has_max_pool


def test_the_negative_control_fails_the_same_check():
    """The network test's check on a network whose head is an adaptive max pool: flagged, as 'raises'."""
    torch.manual_seed(0)
    model = cbam.create_model("cifar_resnet20", attention="cbam", num_classes=5)
    model.avgpool = nn.AdaptiveMaxPool2d(1)
    with reference_only():
        record = record_step(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 4]))
    assert [f.op for f in record.raises] == ["aten::adaptive_max_pool2d_backward"] == [f.op for f in record.flagged]


def test_with_the_cpu_kernels_the_step_calls_them_and_nothing_listed():
    if native.load() is not None:
        pytest.skip(f"the CPU kernels are not available here: {native.load()}")
    _, record = _network_step("resnet18", reference=False)
    assert record.flagged == ()
    assert record.other and all(op.startswith("cbam_cpu::") for op in record.other)


# ----------------------------------------------------------------------------------------- bit-identical training
def _train(path: str, steps: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with deterministic(seed=0):
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        model = cbam.create_model("cifar_resnet20", attention="cbam", num_classes=10)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        data = torch.Generator().manual_seed(1)
        with reference_only() if path == "reference" else contextlib.nullcontext():
            for _ in range(steps):
                x = torch.randn(8, 3, 32, 32, generator=data)
                y = torch.randint(0, 10, (8,), generator=data)
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
        return initial, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("path", "threads"),
    # two threads: slow on a machine whose cores other processes hold (OpenMP waits spin)
    [("kernels", 1), pytest.param("kernels", 2, marks=pytest.mark.slow), ("reference", 1)],
)
def test_training_twice_from_the_same_seed_gives_bit_identical_weights(path, threads):
    if path == "kernels" and native.load() is not None:
        pytest.skip(f"the CPU kernels are not available here: {native.load()}")
    flag_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)  # the module's fixture restores the count
    initial, first = _train(path)
    _, second = _train(path)
    assert torch.are_deterministic_algorithms_enabled() == flag_before  # restored
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different
    moved = [k for k in first if k.endswith("weight") and not torch.equal(first[k], initial[k])]
    assert "layer1.0.attn.spatial.conv.weight" in moved and "fc.weight" in moved  # training happened


def test_deterministic_restores_the_settings_and_the_environment(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with deterministic():
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert before == (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                      torch.backends.cudnn.benchmark)


def test_train_deterministic_flag_sets_the_mode_and_reruns_bit_identically(tmp_path):
    """``cbam train --deterministic``: PyTorch's deterministic mode is on during the run (and off after it), and two
    runs from the same seed give the same weights."""
    seen = []
    original = engine._train_epoch

    def spy(run, position, stop):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(run, position, stop)

    engine._train_epoch = spy
    try:
        runs = []
        for name in ("a", "b"):
            out = tmp_path / name
            argv = ["train", "--dataset", "synthetic", "--model", "cifar_resnet20", "--attention", "cbam",
                    "--image-size", "32", "--synthetic-train-size", "32", "--synthetic-val-size", "16",
                    "--batch-size", "16", "--epochs", "1", "--no-progress", "--workers", "0", "--deterministic",
                    "--output", str(out)]
            assert main(argv) == 0
            runs.append(load_file(str(out / "model.safetensors")))
    finally:
        engine._train_epoch = original
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
