"""Models and comparisons shared by the export tests."""

from __future__ import annotations

import torch
from torch import nn

import cbam
from cbam.layers import CBAM
from cbam.models.mobilenet import DepthwiseSeparable
from cbam.models.resnet import BasicBlock, GlobalAvgPool, conv1x1

SIZES = ((64, 64), (49, 51))  # the export's size and a second, odd one
BATCHES = (1, 2, 5)


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (CBAM's spatial BN starts at weight 0, which makes the
    spatial gate a constant 0.5: an export that lost the spatial branch would still match)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def resnet18(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return randomise(cbam.create_model("resnet18", attention="cbam", num_classes=num_classes))


class Tiny(nn.Module):
    """Every kind of fused block in a few layers: basic blocks with an identity and a downsampling shortcut, and a
    depthwise-separable block (BatchNorm folded into two CBAMs)."""

    def __init__(self) -> None:
        super().__init__()
        kw = {"attn_layer": CBAM, "attn_kwargs": {"reduction": 4}}
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block1 = BasicBlock(16, 16, **kw)
        down = nn.Sequential(conv1x1(16, 32, 2), nn.BatchNorm2d(32))
        self.block2 = BasicBlock(16, 32, 2, down, **kw)
        self.block3 = DepthwiseSeparable(32, 32, attn_layer=CBAM, attn_kwargs={"reduction": 4})
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_fused() -> tuple[nn.Module, nn.Module]:
    """(plain, fused) copies of :class:`Tiny` with the same weights."""
    torch.manual_seed(0)
    plain = randomise(Tiny())
    fused = randomise(Tiny())
    fused.load_state_dict(plain.state_dict())
    changed = cbam.fuse(fused)
    assert changed == ["block1", "block2", "block3"], changed
    return plain, fused


def max_difference(run, model: nn.Module, sizes=SIZES, batches=BATCHES, seed: int = 1) -> float:
    """The largest |run(x) - model(x)| over the batches and sizes (model in eval mode, no gradients)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for h, w in sizes:
            for n in batches:
                x = torch.randn(n, 3, h, w, generator=g)
                got, expected = run(x), model(x)
                assert got.shape == expected.shape
                worst = max(worst, float((got - expected).abs().max()))
    return worst
