"""CBAM(preset="ultralytics"): Ultralytics' CBAM variant, output for output.

The variant, as described (not copied): channel attention = sigmoid of ONE 1 x 1 convolution C -> C with a bias
applied to the average pool only (no reduction, no hidden layer, no ReLU); spatial attention = sigmoid of a k x k
convolution (padding k // 2, no bias, no normalisation) over [mean; max] across channels; channel first, then
spatial. Compared with an independent re-expression written here and, in a separate process (importing Ultralytics
changes numpy's and torch's print options, warning filters and environment variables of the process that imports
it), with Ultralytics' own module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import cbam
from cbam.convert import cbam_to_ultralytics, ultralytics_to_cbam
from cbam.fused.function import cbam_fused, cpu_kernel, supported
from cbam.insertion import identity_gate_
from cbam.layers import CBAM, PRESETS
from cbam.models.complexity import count_macs


def randomised(module: CBAM, seed: int = 0) -> CBAM:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def by_hand(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
    """The description above, in plain tensor operations: w [C, C], b [C], conv [1, 2, k, k]."""
    avg = x.mean(dim=(2, 3))  # (N, C)
    gate_c = torch.sigmoid(avg @ w.T + b)
    y = x * gate_c[:, :, None, None]
    maps = torch.stack([y.mean(dim=1), y.max(dim=1).values], dim=1)  # [mean; max] over channels
    k = conv.shape[-1]
    gate_s = torch.sigmoid(F.conv2d(maps, conv, padding=k // 2))
    return y * gate_s


def test_state_dict_is_one_channel_layer_and_a_bare_conv():
    m = CBAM(24, preset="ultralytics")
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"channel.fc1.weight": (24, 24), "channel.fc1.bias": (24,), "spatial.conv.weight": (1, 2, 7, 7)}
    assert m.channel.fc2 is None and m.spatial.norm is None and m.channel.hidden == 24
    assert m.channel.pool_types == ("avg",)
    assert CBAM(24, preset="ultralytics", kernel_size=3).spatial.conv.padding == (1, 1)


def test_pool_types_default_per_preset_and_explicit_override():
    assert PRESETS["ultralytics"].pool_types == ("avg",)
    for name in ("paper", "seed", "timm"):
        assert CBAM(32, preset=name).channel.pool_types == ("avg", "max")
    assert CBAM(32, preset="ultralytics", pool_types=("avg", "max")).channel.pool_types == ("avg", "max")
    assert CBAM(32, pool_types=("max",)).channel.pool_types == ("max",)


@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("channels", [8, 33])
def test_matches_the_description(kernel_size, channels):
    torch.manual_seed(kernel_size + channels)
    m = randomised(CBAM(channels, preset="ultralytics", kernel_size=kernel_size), seed=channels).eval()
    x = torch.randn(3, channels, 9, 11)
    want = by_hand(x, m.channel.fc1.weight, m.channel.fc1.bias, m.spatial.conv.weight)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.forward_reference(x), want, rtol=1e-5, atol=1e-6)
    # the check can fail: the max pool in the channel gate (the other presets' default) changes the output
    both = randomised(CBAM(channels, preset="ultralytics", kernel_size=kernel_size, pool_types=("avg", "max")),
                      seed=channels)
    assert (both(x) - want).abs().max() > 1e-3


def test_gradients_flow_to_every_parameter():
    m = randomised(CBAM(16, preset="ultralytics"))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    m(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert torch.isfinite(x.grad).all()


def test_reduction_does_not_apply():
    with pytest.raises(ValueError, match="preset 'ultralytics' has one 16 -> 16 channel layer.*reduction=8"):
        CBAM(16, 8, preset="ultralytics")
    with pytest.raises(ValueError, match="hidden=4"):
        CBAM(16, preset="ultralytics", hidden=4)


def test_the_fused_cpu_kernel_declines_and_the_reference_computes():
    m = randomised(CBAM(16, preset="ultralytics"))
    reason = supported(m)
    assert reason is not None and "fc2 is None" in reason
    x = torch.randn(2, 16, 5, 5)
    assert cpu_kernel(m, x) is None
    with pytest.raises(ValueError, match="do not compute a single-layer channel gate"):
        cbam_fused(m, x)
    assert supported(CBAM(16)) is None  # the other presets keep the kernels


def test_macs_count_the_single_layer():
    c, k, h, w = 16, 7, 8, 8
    model = nn.Sequential(CBAM(c, preset="ultralytics", kernel_size=k))
    assert count_macs(model, (h, w), in_chans=c) == c * c + 2 * k * k * h * w


def test_identity_gate_zeroes_the_single_layer():
    m = randomised(CBAM(16, preset="ultralytics"))
    assert identity_gate_(m) == 0.25
    assert not m.channel.fc1.weight.any() and not m.channel.fc1.bias.any() and not m.spatial.conv.weight.any()
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(m(x), x * 0.25)


# --------------------------------------------------------------------------------------------- key mapping
def ultralytics_keys(prefix: str, c: int, k: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}channel_attention.fc.weight": torch.randn(c, c, 1, 1),
        f"{prefix}channel_attention.fc.bias": torch.randn(c),
        f"{prefix}spatial_attention.cv1.weight": torch.randn(1, 2, k, k),
    }


def test_mapping_renames_and_reshapes_and_round_trips():
    torch.manual_seed(0)
    theirs = {**ultralytics_keys("model.9.", 8, 7), **ultralytics_keys("model.12.", 16, 3),
              "model.0.conv.weight": torch.randn(8, 3, 3, 3)}
    ours = ultralytics_to_cbam(theirs)
    assert set(ours) == {"model.9.channel.fc1.weight", "model.9.channel.fc1.bias", "model.9.spatial.conv.weight",
                         "model.12.channel.fc1.weight", "model.12.channel.fc1.bias", "model.12.spatial.conv.weight",
                         "model.0.conv.weight"}
    assert torch.equal(ours["model.9.channel.fc1.weight"], theirs["model.9.channel_attention.fc.weight"][:, :, 0, 0])
    assert torch.equal(ours["model.12.spatial.conv.weight"], theirs["model.12.spatial_attention.cv1.weight"])
    back = cbam_to_ultralytics(ours)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    module = CBAM(8, preset="ultralytics")
    module.load_state_dict(ultralytics_to_cbam(ultralytics_keys("", 8, 7)), strict=True)


def test_mapping_refuses_what_ultralytics_cannot_hold():
    with pytest.raises(ValueError, match=r"channel\.fc2\.bias: Ultralytics' CBAM has one channel layer"):
        cbam_to_ultralytics(CBAM(32).state_dict())
    no_bias = CBAM(8, preset="ultralytics", mlp_bias=False).state_dict()
    with pytest.raises(ValueError, match="channel.fc1.bias is missing"):
        cbam_to_ultralytics(no_bias)
    with pytest.raises(ValueError, match="expected a C -> C weight"):
        ultralytics_to_cbam({"channel_attention.fc.weight": torch.zeros(4, 8, 1, 1)})


# --------------------------------------------------------------------------------------------- Ultralytics itself
ULTRALYTICS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from ultralytics.nn.modules.conv import CBAM

    folder = sys.argv[1]
    x = load_file(f"{folder}/input.safetensors")["x"]
    ours = load_file(f"{folder}/ours.safetensors")
    out = {}
    for k in (3, 7):
        torch.manual_seed(k)
        theirs = CBAM(x.shape[1], kernel_size=k).eval()
        with torch.no_grad():  # spread the default init so that both gates vary
            for p in theirs.parameters():
                p.mul_(4.0)
        out[f"own{k}"] = theirs(x)
        out.update({f"sd{k}.{name}": t.clone() for name, t in theirs.state_dict().items()})
        mapped = {name[len(f"k{k}."):]: t for name, t in ours.items() if name.startswith(f"k{k}.")}
        theirs.load_state_dict(mapped, strict=True)
        out[f"ours{k}"] = theirs(x)
    save_file({k: v.contiguous() for k, v in out.items()}, f"{folder}/out.safetensors")
    print(json.dumps(sorted(out)))
""")


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="ultralytics is not installed")
def test_matches_ultralytics_own_module(tmp_path):
    """Both directions: Ultralytics' weights through ultralytics_to_cbam into ours, ours through cbam_to_ultralytics
    into theirs; same outputs. Ultralytics runs offline (YOLO_OFFLINE) with its settings file in tmp_path."""
    torch.manual_seed(5)
    c = 12
    x = torch.randn(2, c, 10, 9)
    ours = {k: randomised(CBAM(c, preset="ultralytics", kernel_size=k), seed=k).eval() for k in (3, 7)}
    save_file({"x": x}, tmp_path / "input.safetensors")
    save_file({f"k{k}.{name}": t.contiguous() for k, m in ours.items()
               for name, t in cbam_to_ultralytics(m.state_dict()).items()}, tmp_path / "ours.safetensors")
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "config"), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", ULTRALYTICS_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "own3" in json.loads(done.stdout.strip().splitlines()[-1])
    out = load_file(tmp_path / "out.safetensors")
    for k in (3, 7):
        torch.testing.assert_close(out[f"ours{k}"], ours[k](x), rtol=1e-5, atol=1e-6)
        theirs_sd = {name.removeprefix(f"sd{k}."): t for name, t in out.items() if name.startswith(f"sd{k}.")}
        mine = CBAM(c, preset="ultralytics", kernel_size=k).eval()
        mine.load_state_dict(ultralytics_to_cbam(theirs_sd), strict=True)
        torch.testing.assert_close(mine(x), out[f"own{k}"], rtol=1e-5, atol=1e-6)
        assert (out[f"own{k}"] - x).abs().max() > 1e-2  # the gates are not trivially 1


def test_networks_with_the_preset_fuse_nothing_and_insert_as_identity():
    model = randomised(cbam.models.create_model("resnet18", attention="cbam", preset="ultralytics", num_classes=5))
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    assert cbam.fuse(model) == []  # every block keeps its plain forward: the kernels decline the module
    with torch.no_grad():
        assert torch.equal(model(x), want)
    net = torchvision.models.resnet18(num_classes=5).eval()
    with torch.no_grad():
        before = net(x)
    assert len(cbam.insert(net, "cbam", preset="ultralytics")) == 8
    with torch.no_grad():
        assert torch.equal(net(x), before)  # identity: fc1 and the spatial conv start at zero, the BN before x4
