"""``cbam.record``: the gates of every CBAM module by path, equal to the formulas, on package networks, after
``cbam.insert`` and after ``cbam.fuse``; the outputs unchanged and no hook left behind."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cbam
from cbam.layers import reference_only


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _expected(module: cbam.CBAM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formulas written out: Mc from avg and max pools through the shared MLP, Ms from [mean; max]."""
    ch = module.channel
    mlp = lambda v: ch.fc2(torch.relu(ch.fc1(v)))  # noqa: E731
    channel = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
    refined = x * channel[:, :, None, None]
    maps = torch.cat([refined.mean(1, keepdim=True), refined.amax(1, keepdim=True)], 1)
    sp = module.spatial
    s = sp.conv(maps)
    s = (s - sp.norm.running_mean) / torch.sqrt(sp.norm.running_var + sp.norm.eps) * sp.norm.weight + sp.norm.bias
    return channel, torch.sigmoid(s)


def _randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
    return model.eval()


def test_shapes_paths_values_and_no_hooks_left() -> None:
    torch.manual_seed(0)
    model = _randomise(cbam.create_model("resnet18", attention="cbam", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain_out = model(x)
    inputs = {}
    handles = [m.register_forward_hook(lambda m, a, o, p=p: inputs.__setitem__(p, a[0]))
               for p, m in model.named_modules() if isinstance(m, cbam.CBAM)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    with cbam.record(model) as rec, torch.no_grad():
        out = model(x)
    assert torch.equal(out, plain_out)
    assert _no_hooks(model)
    assert rec.paths == [f"layer{s}.{b}.attn" for s in range(1, 5) for b in range(2)]
    sizes = {1: 16, 2: 8, 3: 4, 4: 2}
    for path in rec.paths:
        stage = int(path[5])
        assert rec.channel[path].shape == (2, 64 * 2 ** (stage - 1))
        assert rec.spatial[path].shape == (2, 1, sizes[stage], sizes[stage])
        channel, spatial = _expected(model.get_submodule(path), inputs[path])
        torch.testing.assert_close(rec.channel[path], channel, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec.spatial[path], spatial, rtol=1e-5, atol=1e-6)
        assert ((rec.spatial[path] > 0) & (rec.spatial[path] < 1)).all()


def test_after_insert_and_after_fuse() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    cbam.insert(model, init="paper")
    x = torch.randn(1, 3, 64, 64)
    with cbam.record(model) as rec, torch.no_grad():
        out = model(x)
    assert len(rec.paths) == 16 and rec.paths[0] == "layer1.0.attn"
    assert rec.spatial["layer4.2.attn"].shape == (1, 1, 2, 2)
    fused = cbam.fuse(model)  # without a C++ compiler the blocks are still swapped; they then run the reference
    assert len(fused) == 16
    with cbam.record(model) as rec_fused, torch.no_grad():
        out_fused = model(x)
    torch.testing.assert_close(out_fused, out, rtol=1e-4, atol=1e-5)
    assert rec_fused.paths == rec.paths and _no_hooks(model)
    for path in rec.paths:
        torch.testing.assert_close(rec_fused.channel[path], rec.channel[path], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rec_fused.spatial[path], rec.spatial[path], rtol=1e-4, atol=1e-6)
    with reference_only(), cbam.record(model) as rec_ref, torch.no_grad():
        model(x)
    torch.testing.assert_close(rec_ref.spatial["layer2.0.attn"], rec.spatial["layer2.0.attn"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arrangement", ["spatial_first", "parallel"])
def test_other_arrangements_and_channel_only(arrangement: str) -> None:
    module = cbam.CBAM(32, arrangement=arrangement).eval()
    x = torch.randn(2, 32, 8, 8)
    with cbam.record(module) as rec, torch.no_grad():
        module(x)
    assert rec.paths == [""] and rec.channel[""].shape == (2, 32) and rec.spatial[""].shape == (2, 1, 8, 8)
    channel_only = cbam.CBAM(32, spatial=False)
    with cbam.record(channel_only) as rec, torch.no_grad():
        channel_only(x)
    assert "" in rec.channel and "" not in rec.spatial


def test_hooks_removed_after_an_error_and_bad_models() -> None:
    model = cbam.create_model("cifar_resnet20", attention="cbam")
    with pytest.raises(RuntimeError), cbam.record(model):
        model(torch.randn(1, 5, 32, 32))  # wrong channel count: the stem conv raises
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="record: ResNet has no CBAM module to record"):
        with cbam.record(cbam.create_model("resnet18", attention="se")):
            pass
    with pytest.raises(TypeError, match="record: expected an nn.Module, got str"):
        with cbam.record("resnet18"):
            pass
