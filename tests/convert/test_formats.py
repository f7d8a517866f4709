"""Every supported checkpoint format gives the source network's logits in this package's ResNet-18/34/50/101.

The sources are built independently of this package's models:

* the authors' release: its state dict is generated here from the key list of paper-facts.md ("The reference
  release") with random weights, and run by ``release_forward``, a functional re-expression of their network written
  from those facts ([max; mean] spatial input, spatial BatchNorm, MLP with biases, bottleneck stride on the 3 x 3
  conv, global average pool: the release's AvgPool2d(7) at 224 x 224);
* timm: timm's own ResNet built with ``block_args=dict(attn_layer="cbam")``;
* torchvision: torchvision's own ResNet.

Random BatchNorm statistics and affine parameters everywhere (the spatial BatchNorm included, whose default weight 0
would make the spatial gate a constant 1/2 and hide a wrong input order). The logits are compared in float64, so that
the difference measured is the conversion's, not float32 rounding amplified through 100 random layers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cbam
from cbam.convert import convert_state_dict, fit_state_dict, infer_model, to_cbam_layout
from cbam.train.checkpoint import save_weights

timm_resnet = pytest.importorskip("timm.models.resnet")

BLOCKS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]), 101: (True, [3, 4, 23, 3])}
# ResNet-18 and -50 (both block types) by default; -34 and -101 (more blocks of the same types) with the slow tests
DEPTHS = [18, 50, pytest.param(34, marks=pytest.mark.slow), pytest.param(101, marks=pytest.mark.slow)]
CLASSES = 10
RTOL = 1e-4


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the largest logit."""
    return float((got - want).abs().max() / want.abs().max())


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine steps, random biases; the convolutions keep their random init."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------------ the authors' release
def release_state_dict(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The release's keys and shapes for ResNet-``depth`` + CBAM (paper-facts.md), random weights."""
    bottleneck, blocks = BLOCKS[depth]
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def conv(name: str, out: int, inp: int, k: int) -> None:
        sd[f"{name}.weight"] = rand(out, inp, k, k, scale=math.sqrt(2.0 / (inp * k * k)))

    def bn(name: str, c: int, spatial: bool = False, last: bool = False) -> None:
        # the spatial gate's BatchNorm gets a large weight of either sign, so that the spatial gate matters; the
        # residual branch's last one a small weight, as in trained networks, so that 33 blocks do not blow up
        sd[f"{name}.weight"] = rand(c, scale=2.0) if spatial else (1.0 + rand(c, scale=0.3)) * (0.3 if last else 1)
        sd[f"{name}.bias"] = rand(c, scale=0.2)
        sd[f"{name}.running_mean"] = rand(c, scale=0.2)
        sd[f"{name}.running_var"] = torch.rand(c, generator=gen) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    def attention(name: str, c: int) -> None:
        hidden = c // 16
        sd[f"{name}.ChannelGate.mlp.1.weight"] = rand(hidden, c, scale=1 / math.sqrt(c))
        sd[f"{name}.ChannelGate.mlp.1.bias"] = rand(hidden, scale=0.2)
        sd[f"{name}.ChannelGate.mlp.3.weight"] = rand(c, hidden, scale=1 / math.sqrt(hidden))
        sd[f"{name}.ChannelGate.mlp.3.bias"] = rand(c, scale=0.2)
        sd[f"{name}.SpatialGate.spatial.conv.weight"] = rand(1, 2, 7, 7, scale=0.3)
        bn(f"{name}.SpatialGate.spatial.bn", 1, spatial=True)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            out = planes * (4 if bottleneck else 1)
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", out, planes, 1)
                bn(f"{p}.bn3", out, last=True)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes, last=True)
            if i == 0 and (stage > 1 or inplanes != out):
                conv(f"{p}.downsample.0", out, inplanes, 1)
                bn(f"{p}.downsample.1", out)
            attention(f"{p}.cbam", out)
            inplanes = out
    sd["fc.weight"] = rand(CLASSES, inplanes, scale=1 / math.sqrt(inplanes))
    sd["fc.bias"] = rand(CLASSES, scale=0.2)
    return sd


def release_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, order: str = "max_mean") -> torch.Tensor:
    """The release's ResNet + CBAM at inference, from its state dict alone (``order``: the spatial input order)."""
    bottleneck, blocks = BLOCKS[depth]
    sd = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in sd.items()}

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)

    def cbam_module(t: torch.Tensor, name: str) -> torch.Tensor:
        def mlp(v: torch.Tensor) -> torch.Tensor:
            h = F.relu(F.linear(v, sd[f"{name}.ChannelGate.mlp.1.weight"], sd[f"{name}.ChannelGate.mlp.1.bias"]))
            return F.linear(h, sd[f"{name}.ChannelGate.mlp.3.weight"], sd[f"{name}.ChannelGate.mlp.3.bias"])

        t = t * torch.sigmoid(mlp(t.mean(dim=(2, 3))) + mlp(t.amax(dim=(2, 3))))[:, :, None, None]
        mx, mean = t.amax(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
        maps = torch.cat([mx, mean] if order == "max_mean" else [mean, mx], dim=1)
        s = F.conv2d(maps, sd[f"{name}.SpatialGate.spatial.conv.weight"], padding=3)
        s = bn(s, f"{name}.SpatialGate.spatial.bn")
        return t * torch.sigmoid(s)

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, count in enumerate(blocks, start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            if bottleneck:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            out = cbam_module(out, f"{p}.cbam")
            shortcut = x
            if f"{p}.downsample.0.weight" in sd:
                shortcut = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + shortcut)
    return F.linear(x.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def release_checkpoint(sd: dict[str, torch.Tensor], *, dataparallel: bool = True, tracked: bool = True) -> dict:
    """The release's file: DataParallel keys, beside the epoch, arch, best top-1 and optimizer state."""
    keys = {k: v for k, v in sd.items() if tracked or not k.endswith("num_batches_tracked")}
    keys = {("module." if dataparallel else "") + k: v for k, v in keys.items()}
    return {"epoch": 100, "arch": "resnet", "state_dict": keys, "best_prec1": 77.622,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}}


@pytest.mark.parametrize("depth", DEPTHS)
def test_release(tmp_path, depth):
    sd = release_state_dict(depth, seed=depth)
    assert len(sd) == {18: 202, 34: 378, 50: 480, 101: 956}[depth]  # 480 for ResNet-50 as paper-facts.md says
    path = tmp_path / "release.pth.tar"
    torch.save(release_checkpoint(sd), path)
    model = cbam.create_model(f"resnet{depth}", attention="cbam", num_classes=CLASSES, checkpoint=path).eval().double()
    assert model.checkpoint_format == "release"
    x = images(depth)
    with torch.no_grad():
        want, got = release_forward(sd, x, depth), model(x)
        wrong_order = release_forward(sd, x, depth, order="mean_max")
    assert close(got, want) < RTOL
    assert close(got, wrong_order) > 100 * RTOL  # the check can fail: without the swap the logits move


@pytest.mark.parametrize("dataparallel, tracked", [(False, True), (True, False), (False, False)])
def test_release_without_module_prefix_or_num_batches_tracked(dataparallel, tracked):
    sd = release_state_dict(18, seed=1)
    model = cbam.models.create_model("resnet18", attention="cbam", num_classes=CLASSES)
    state, fmt = convert_state_dict(release_checkpoint(sd, dataparallel=dataparallel, tracked=tracked), model)
    assert fmt == "release"
    model.load_state_dict(state, strict=True)
    x = images(1)
    with torch.no_grad():
        assert close(model.eval().double()(x), release_forward(sd, x, 18)) < RTOL
    if not tracked:
        assert int(state["layer1.0.bn1.num_batches_tracked"]) == 0


def test_release_spatial_weight_is_swapped_exactly():
    sd = release_state_dict(18, seed=2)
    ours = to_cbam_layout(sd, "release")
    src = sd["layer2.1.cbam.SpatialGate.spatial.conv.weight"]
    dst = ours["layer2.1.attn.spatial.conv.weight"]
    assert torch.equal(dst[:, 0], src[:, 1]) and torch.equal(dst[:, 1], src[:, 0])
    assert torch.equal(ours["layer2.1.attn.channel.fc2.bias"], sd["layer2.1.cbam.ChannelGate.mlp.3.bias"])
    assert torch.equal(ours["layer2.1.attn.spatial.norm.running_var"],
                       sd["layer2.1.cbam.SpatialGate.spatial.bn.running_var"])


# ------------------------------------------------------------------------------------------ timm
def timm_cbam_resnet(depth: int, **block_args) -> nn.Module:
    bottleneck, blocks = BLOCKS[depth]
    block = timm_resnet.Bottleneck if bottleneck else timm_resnet.BasicBlock
    net = timm_resnet.ResNet(block, blocks, num_classes=CLASSES, block_args={"attn_layer": "cbam", **block_args})
    return randomise_(net, seed=depth).double()


@pytest.mark.parametrize("depth", DEPTHS)
def test_timm(tmp_path, depth):
    net = timm_cbam_resnet(depth)
    assert "layer1.0.se.channel.fc1.weight" in net.state_dict()
    path = tmp_path / "timm.pth"
    torch.save(net.state_dict(), path)
    x = images(depth)
    with torch.no_grad():
        want = net(x)
    model = cbam.create_model(f"resnet{depth}", attention="cbam", num_classes=CLASSES, checkpoint=path).eval().double()
    assert model.checkpoint_format == "timm"
    assert not model.layer1[0].attn.channel.fc1.bias.any()  # timm's MLP has no bias: zeros are exactly that
    with torch.no_grad():
        assert close(model(x), want) < RTOL


def test_timm_into_the_bias_free_timm_preset_and_refusal_of_nonzero_biases():
    net = timm_cbam_resnet(18)
    x = images(3)
    with torch.no_grad():
        want = net(x)
    model = cbam.models.create_model("resnet18", attention="cbam", preset="timm", num_classes=CLASSES)
    state, fmt = convert_state_dict(net.state_dict(), model)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert fmt == "timm" and close(model.eval().double()(x), want) < RTOL
    release = release_state_dict(18)  # its MLP biases are not zero: the bias-free model cannot hold them
    with pytest.raises(ValueError, match=r"layer1\.0\.attn\.channel\.fc1\.bias is not zero but resnet18"):
        convert_state_dict(release, model)


# ------------------------------------------------------------------------------------------ torchvision
@pytest.mark.parametrize("depth", DEPTHS)
def test_torchvision(tmp_path, depth):
    net = randomise_(getattr(torchvision.models, f"resnet{depth}")(num_classes=CLASSES), seed=depth)
    path = tmp_path / "tv.pth"
    torch.save(net.state_dict(), path)
    net.double()
    x = images(depth)
    with torch.no_grad():
        want = net(x)
    plain = cbam.create_model(f"resnet{depth}", num_classes=CLASSES, checkpoint=path).eval().double()
    attended = cbam.create_model(f"resnet{depth}", attention="cbam", num_classes=CLASSES, checkpoint=path)
    attended.eval().double()
    assert plain.checkpoint_format == attended.checkpoint_format == "torchvision"
    with torch.no_grad():
        assert torch.equal(plain(x), want)
        assert torch.equal(attended(x), want)  # identity attention: exactly the plain network's logits
    assert not attended.layer1[0].attn.channel.fc2.weight.any()
    last = "bn3" if depth >= 50 else "bn2"  # the BatchNorm in front of the module carries the factor 4
    assert torch.equal(getattr(attended.layer1[0], last).weight, 4 * getattr(net.layer1[0], last).weight)


def test_convert_state_dict_leaves_the_model_alone():
    net = randomise_(torchvision.models.resnet18(num_classes=CLASSES))
    model = cbam.models.create_model("resnet18", attention="cbam", num_classes=CLASSES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, fmt = convert_state_dict({"state_dict": net.state_dict()}, model)
    assert fmt == "torchvision" and list(state) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ this package's own
@pytest.mark.parametrize("preset", ["paper", "timm", "seed", "ultralytics"])
def test_own_safetensors_round_trip(tmp_path, preset):
    model = randomise_(cbam.models.create_model("resnet18", attention="cbam", num_classes=CLASSES, preset=preset))
    path = save_weights(tmp_path / "model.safetensors", model, {"model": "resnet18", "attention": "cbam"})
    loaded = cbam.create_model("resnet18", attention="cbam", num_classes=CLASSES, preset=preset, checkpoint=path)
    assert loaded.checkpoint_format == "cbam"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    spec = infer_model(loaded.state_dict(), metadata={"model": "resnet18", "attention": "cbam"}, own=True)
    rebuilt = spec.build()
    rebuilt.load_state_dict(fit_state_dict(model.state_dict(), rebuilt), strict=True)
    x = images(4)
    with torch.no_grad():
        # the options that show in the tensors were inferred
        assert torch.equal(rebuilt.eval().double()(x), model.double()(x))


def test_infer_model_from_the_structure():
    for depth in BLOCKS:
        sd = getattr(torchvision.models, f"resnet{depth}")(num_classes=7).state_dict()
        spec = infer_model(sd)
        assert (spec.name, spec.attention, spec.num_classes, spec.model_kwargs) == (f"resnet{depth}", "none", 7, {})
    cifar = cbam.models.create_model("resnet50_cifar", attention="cbam", reduction=8, kernel_size=3).state_dict()
    spec = infer_model(cifar, own=True)
    assert (spec.name, spec.num_classes, spec.module_kwargs) == ("resnet50_cifar", 10, {"reduction": 8,
                                                                                         "kernel_size": 3})
    wide = cbam.models.create_model("wide_resnet18").state_dict()
    with pytest.raises(ValueError, match="wide or grouped ResNet; name the model"):
        infer_model(wide)
