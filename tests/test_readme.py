"""The README's Python example runs as written, and its commands name real subcommands."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_example_runs():
    block = python_blocks()[0]
    assert len(block.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(block, "README quickstart", "exec"), namespace)
    changed = namespace["changed"]  # what cbam.fuse returned for a CBAM ResNet-50 on the CPU
    assert isinstance(changed, list) and changed and all(isinstance(path, str) for path in changed)


def test_networks_example_runs():
    exec(compile(python_blocks()[1], "README networks", "exec"), {})


def test_first_screen_has_the_two_commands():
    head = README.read_text().split("##")[0]
    assert "make demo" in head and "make test" in head


def test_insert_example_runs():
    """The "networks you already have" block: CBAM inserted into torchvision's ResNet-50, the logits unchanged."""
    block = python_blocks()[2]
    assert "cbam.insert" in block
    namespace: dict = {}
    exec(compile(block, "README insert", "exec"), namespace)
    assert len(namespace["paths"]) == 16


def test_detection_and_segmentation_example_runs():
    """Faster R-CNN and DeepLabV3 on CBAM backbones, and torchvision's own after cbam.insert: losses backpropagate
    into the CBAM modules, detections and segmentation logits have their shapes."""
    block = python_blocks()[3]
    namespace: dict = {}
    exec(compile("import torch, cbam\n" + block, "README detection", "exec"), namespace)
    torch = namespace["torch"]
    cbam = namespace["cbam"]
    for model in (*namespace["detectors"], *namespace["segmenters"]):
        modules = [m for m in model.modules() if isinstance(m, cbam.CBAM)]
        assert len(modules) == 16
        assert all(m.channel.fc2.weight.grad is not None and m.channel.fc2.weight.grad.abs().sum() > 0
                   for m in modules)
    assert namespace["boxes"].shape[1:] == (4,)
    assert torch.isfinite(namespace["images"]).all()


def test_keras_example_is_the_one_tests_keras_runs():
    """The README's Keras example is docs/keras.md's first python block, which tests/keras/test_keras_example.py runs
    (under the Keras backend its conftest sets)."""
    docs = re.findall(r"```python\n(.*?)```", (README.parent / "docs" / "keras.md").read_text(), flags=re.S)
    assert python_blocks()[4] == docs[0]
    assert "model.fit" in docs[0] and "cbam.keras" in docs[0]
