"""Inserted torchvision and timm ResNets fuse through the same block registry: ``cbam.fuse`` finds their blocks after
``cbam.insert`` and computes what the unfused network computes (float64, outputs, gradients, statistics)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision

import cbam
from cbam.fused.blocks import (
    FusedTimmBasicBlock,
    FusedTimmBottleneck,
    FusedTorchvisionBasicBlock,
    FusedTorchvisionBottleneck,
)

pytestmark = pytest.mark.usefixtures("native")


@pytest.mark.parametrize(("name", "fused_type"), [("resnet18", FusedTorchvisionBasicBlock),
                                                  ("resnet50", FusedTorchvisionBottleneck),
                                                  ("timm/resnet18", FusedTimmBasicBlock),
                                                  ("timm/resnet26", FusedTimmBottleneck)])
def test_inserted_resnet_fuses(name: str, fused_type: type) -> None:
    torch.manual_seed(0)
    if name.startswith("timm/"):
        model = timm.create_model(name.split("/")[1], num_classes=10).double()
    else:
        model = getattr(torchvision.models, name)(num_classes=10).double()
    paths = cbam.insert(model, init="paper")
    blocks = sorted({p.rsplit(".", 1)[0] for p in paths})
    plain = copy.deepcopy(model)
    assert sorted(cbam.fuse(model)) == blocks
    assert all(type(model.get_submodule(b)) is fused_type for b in blocks)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        plain.train(mode == "train")
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        out, expected = model(xs[0]), plain(xs[1])
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
        if mode == "train":
            out.square().sum().backward()
            expected.square().sum().backward()
            torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-8, atol=1e-10)
            for (k, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=k)
    for (k, b), c in zip(model.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12, msg=k)
    assert sorted(cbam.unfuse(model)) == blocks
    assert type(model.get_submodule(blocks[0])) is fused_type.fused_from
