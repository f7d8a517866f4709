"""He et al.'s CIFAR ResNets: sizes, the parameter-free option-A shortcut, attention placement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam.layers import BAM, CBAM
from cbam.models import count_params, create_model, profile_model
from cbam.models.cifar import CifarBasicBlock, CifarResNet, ShortcutA


@pytest.mark.parametrize(
    ("name", "params", "blocks"),
    [("cifar_resnet20", 269_722, 9), ("cifar_resnet56", 853_018, 27), ("cifar_resnet110", 1_727_962, 54)],
)
def test_sizes(name, params, blocks):
    """He et al. report 0.27M / 0.85M / 1.7M parameters."""
    with torch.device("meta"):
        model = create_model(name)
    assert count_params(model) == params
    assert sum(isinstance(m, CifarBasicBlock) for m in model.modules()) == blocks


def test_resnet20_macs():
    assert profile_model("cifar_resnet20")["macs"] == 40_551_040  # ~41M, at 32 x 32


def test_option_a_shortcut():
    shortcut = ShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0
    assert not list(shortcut.parameters())


def test_attention_placement():
    with torch.device("meta"):
        model = create_model("cifar_resnet20", attention="cbam")
        bam = create_model("cifar_resnet20", attention="bam")
    assert all(isinstance(b.attn, CBAM) for b in model.modules() if isinstance(b, CifarBasicBlock))
    assert isinstance(model.bam1, nn.Identity) and isinstance(model.bam2, nn.Identity)
    assert isinstance(bam.bam1, BAM) and bam.bam1.channels == 16
    assert isinstance(bam.bam2, BAM) and bam.bam2.channels == 32
    assert not hasattr(bam, "bam3")


def test_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
    assert CifarResNet(32).layer1.__len__() == 5
