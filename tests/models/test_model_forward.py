"""Every registered model with every attention builds, runs, and trains every parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam.layers import CBAM
from cbam.models import create_model, list_models, model_meta

ATTENTIONS = (None, "se", "cbam", "bam")


def _input(name: str, batch: int = 2) -> torch.Tensor:
    # Small but deep enough for every stage: ImageNet models (stride 32) at 32 px end at 1 x 1;
    # CIFAR-stem models (stride 8, 4 for the classic ones) at 16 px end at 2 x 2 / 4 x 4.
    size = 16 if model_meta(name)["input_size"] == 32 else 32
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name, attention):
    torch.manual_seed(0)
    model = create_model(name, attention=attention, num_classes=10)
    with torch.no_grad():
        out = model(_input(name))  # training mode: BatchNorm on batch statistics (BAM needs batch >= 2)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


CHEAP = ("cifar_resnet20", "resnet18", "resnet50", "mobilenet_v1")
GRAD_CASES = [(n, a) for n in CHEAP for a in ATTENTIONS] + [
    ("resnext50_32x4d", "cbam"),
    ("wide_resnet18", "cbam"),
    ("resnet18_cifar", "cbam"),
    ("resnet50_cifar", "bam"),
]


def _biases_before_batchnorm(model: nn.Module) -> set[str]:
    """Biases of layers directly followed by a BatchNorm (BAM has them): BN cancels them, gradient 0."""
    names = set()
    for prefix, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            mods = list(seq.named_children())
            for (name, m), (_, nxt) in zip(mods[:-1], mods[1:], strict=True):
                if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and getattr(m, "bias", None) is not None:
                    names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


@pytest.mark.parametrize(("name", "attention"), GRAD_CASES)
def test_every_parameter_gets_a_gradient(name, attention):
    torch.manual_seed(0)
    model = create_model(name, attention=attention, num_classes=10)
    # CBAM's spatial BN starts at weight 0 (gate at exactly 0.5), which legitimately zeroes the gradient of
    # its conv; so every BN weight is set to 1. SE keeps PyTorch's random Linear biases, and a 2-unit MLP can
    # then be all-dead ReLU for a small batch; with zero biases its pre-activations average to 0 over the
    # batch (the pooled input comes straight from a BN), so some sample keeps every unit alive.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    out = model(_input(name))
    (out * torch.randn_like(out)).sum().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    cancelled = _biases_before_batchnorm(model)
    assert (attention == "bam") == bool(cancelled)
    zero = [
        k
        for k, p in model.named_parameters()
        if p.grad is not None and not p.grad.abs().sum() > 0 and k not in cancelled
    ]
    assert not missing, f"parameters outside the graph: {missing[:5]}"
    assert not zero, f"parameters with zero gradient: {zero[:5]}"


def test_cbam_init_is_left_to_the_module():
    """The network's init must not touch attention modules: CBAM's spatial BN stays at weight 0, bias 0."""
    torch.manual_seed(0)
    model = create_model("resnet18", attention="cbam", num_classes=10)
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert cbams
    for m in cbams:
        assert torch.count_nonzero(m.spatial.norm.weight) == 0
        assert torch.count_nonzero(m.spatial.norm.bias) == 0
    out = model(_input("resnet18"))
    out.sum().backward()
    # ... hence, at initialisation, the spatial conv gets no gradient (its gate is a constant 0.5).
    assert all(torch.count_nonzero(m.spatial.conv.weight.grad) == 0 for m in cbams)
    # The network's own layers are initialised as in the release.
    assert torch.all(model.bn1.weight == 1) and torch.all(model.fc.bias == 0)
    std = model.conv1.weight.std().item()
    fan_out = 64 * 7 * 7
    assert abs(std - (2 / fan_out) ** 0.5) < 0.1 * (2 / fan_out) ** 0.5
