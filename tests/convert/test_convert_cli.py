"""``cbam convert`` in-process: what it writes loads with ``cbam.create_model(..., checkpoint=OUT)``, its summary is one
line, and bad input is exit code 2 with one line on stderr and nothing written (an existing OUT left untouched)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
import torchvision
import yaml
from safetensors import safe_open

import cbam
from cbam.cli import main
from cbam.train.checkpoint import save_weights

timm_resnet = pytest.importorskip("timm.models.resnet")


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


class MakesADirectory:
    """Unpickling this calls os.mkdir(path)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def convert(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def torchvision18(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tv")
    net = randomise_(torchvision.models.resnet18(num_classes=10))
    torch.save(net.state_dict(), folder / "tv18.pth")
    return folder / "tv18.pth", net


def test_torchvision_plain_and_with_identity_cbam(tmp_path, capsys, torchvision18):
    source, net = torchvision18
    x = images()
    with torch.no_grad():
        want = net(x)
    code, out, err = convert(capsys, source, tmp_path / "plain.safetensors")
    assert code == 0 and not err and len(out.splitlines()) == 1
    assert "torchvision's plain ResNet format" in out and "resnet18" in out
    assert "logits match torchvision's network" in out
    plain = cbam.create_model("resnet18", num_classes=10, checkpoint=tmp_path / "plain.safetensors").eval()
    assert plain.checkpoint_format == "cbam"
    code, out, _ = convert(capsys, source, tmp_path / "cbam.safetensors", "--attention", "cbam")
    assert code == 0 and "attention cbam" in out and "max relative difference 0.0e+00" in out
    attended = cbam.create_model("resnet18", attention="cbam", num_classes=10, checkpoint=tmp_path / "cbam.safetensors")
    with torch.no_grad():
        assert torch.equal(plain(x), want) and torch.equal(attended.eval()(x), want)
    meta = metadata(tmp_path / "cbam.safetensors")
    assert meta["format"] == "cbam" and meta["model"] == "resnet18" and meta["attention"] == "cbam"
    assert meta["num_classes"] == "10" and meta["source_format"] == "torchvision" and meta["source_file"] == "tv18.pth"
    assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert json.loads(meta["module_kwargs"]) == {} and json.loads(meta["model_kwargs"]) == {}
    assert len(meta["sha256"]) == 64  # the weights' own digest, checked on every load


def test_timm_checked_against_timm(tmp_path, capsys):
    net = randomise_(timm_resnet.ResNet(timm_resnet.BasicBlock, [2, 2, 2, 2], num_classes=10,
                                        block_args={"attn_layer": "cbam"}))
    torch.save({"state_dict": net.state_dict(), "epoch": 3, "arch": "resnet18"}, tmp_path / "timm.pth.tar")
    code, out, _ = convert(capsys, tmp_path / "timm.pth.tar", tmp_path / "out.safetensors")
    assert code == 0 and "timm's CBAM ResNet format" in out and "logits match timm's network" in out
    model = cbam.create_model("resnet18", attention="cbam", num_classes=10, checkpoint=tmp_path / "out.safetensors")
    with torch.no_grad():
        want = net(images())
        assert float((model.eval()(images()) - want).abs().max() / want.abs().max()) < 1e-4


def test_release_is_converted_and_says_it_is_unchecked(tmp_path, capsys):
    model = randomise_(cbam.models.create_model("resnet18", attention="cbam", num_classes=5))
    release = {}
    for key, value in model.state_dict().items():  # this package's keys written back in the release's layout
        key = key.replace("attn.channel.fc1", "cbam.ChannelGate.mlp.1").replace("attn.channel.fc2",
                                                                                 "cbam.ChannelGate.mlp.3")
        key = key.replace("attn.spatial.norm", "cbam.SpatialGate.spatial.bn")
        if key.endswith("attn.spatial.conv.weight"):
            key, value = key.replace("attn.spatial.conv", "cbam.SpatialGate.spatial.conv"), value.flip(1)
        release["module." + key] = value
    torch.save({"state_dict": release, "arch": "resnet", "epoch": 1, "best_prec1": 0.0, "optimizer": {}},
               tmp_path / "release.pth.tar")
    code, out, _ = convert(capsys, tmp_path / "release.pth.tar", tmp_path / "out.safetensors")
    assert code == 0 and "the authors' release format" in out and "not checked against the source network" in out
    back = cbam.create_model("resnet18", attention="cbam", num_classes=5, checkpoint=tmp_path / "out.safetensors")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_own_files_keep_their_options(tmp_path, capsys):
    model = randomise_(cbam.models.create_model("resnet18", attention="cbam", num_classes=4, preset="ultralytics",
                                                kernel_size=3))
    save_weights(tmp_path / "a.safetensors", model, {"model": "resnet18", "attention": "cbam"})
    code, out, _ = convert(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert code == 0 and "this package's format" in out and "preset=ultralytics" in out and "kernel_size=3" in out
    assert json.loads(metadata(tmp_path / "b.safetensors")["module_kwargs"]) == {"preset": "ultralytics",
                                                                                 "kernel_size": 3}
    loaded = cbam.create_model("resnet18", attention="cbam", num_classes=4, preset="ultralytics", kernel_size=3,
                               checkpoint=tmp_path / "b.safetensors")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # a flag the tensors cannot show, recorded and read back from the converted file
    code, out, _ = convert(capsys, tmp_path / "b.safetensors", tmp_path / "c.safetensors", "--pool-types", "avg,max")
    assert code == 0 and "pool_types=('avg', 'max')" in out
    code, out, _ = convert(capsys, tmp_path / "c.safetensors", tmp_path / "d.safetensors")
    assert code == 0 and json.loads(metadata(tmp_path / "d.safetensors")["module_kwargs"])["pool_types"] == ["avg",
                                                                                                           "max"]


def test_a_training_runs_config_supplies_what_the_tensors_do_not_show(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    model = cbam.models.create_model("resnet18", attention="cbam", num_classes=3, reduction=8, pool_types=("max",))
    save_weights(run / "model.safetensors", model, {"model": "resnet18", "attention": "cbam"})
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "resnet18", "attention": "cbam", "reduction": 8,
                                                     "pool_types": ["max"], "arrangement": None}))
    code, out, _ = convert(capsys, run / "model.safetensors", tmp_path / "out.safetensors")
    assert code == 0
    assert json.loads(metadata(tmp_path / "out.safetensors")["module_kwargs"]) == {"reduction": 8,
                                                                                   "pool_types": ["max"]}
    (run / "config.yaml").unlink()  # without the run's record the reduction still shows in the tensors
    code, out, _ = convert(capsys, run / "model.safetensors", tmp_path / "out2.safetensors")
    assert code == 0 and json.loads(metadata(tmp_path / "out2.safetensors")["module_kwargs"]) == {"reduction": 8}


def failed(capsys, *argv) -> str:
    code, out, err = convert(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and not out and len(lines) == 1 and lines[0].startswith("cbam convert: error: "), (code, err)
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, torchvision18):
    source, _ = torchvision18
    out = tmp_path / "out.safetensors"
    torch.save({"a.weight": torch.randn(3)}, tmp_path / "random.pt")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(MakesADirectory(str(tmp_path / "ran")), protocol=2))
    cases = [
        ([tmp_path / "missing.pth", out], "does not exist"),
        ([tmp_path / "random.pt", out], "not a checkpoint layout this package knows"),
        ([tmp_path / "evil.pth", out], "weights_only=True"),
        ([source, out, "--model", "resnet34"], "do not fit resnet34"),
        ([source, out, "--model", "resnet9000"], "unknown model 'resnet9000'"),
        ([source, out, "--attention", "cbam", "--preset", "ultralytics", "--reduction", "4"], "no reduction"),
        ([source, tmp_path / "out.pt"], "must be a .safetensors file"),
    ]
    for argv, words in cases:
        assert words in failed(capsys, *argv)
        assert not out.exists() and not (tmp_path / "out.pt").exists()
    assert not (tmp_path / "ran").exists()
    out.write_bytes(b"previous contents")
    assert "do not fit resnet34" in failed(capsys, source, out, "--model", "resnet34")
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth", "out.safetensors", "random.pt"]  # no temp file
    code, _, err = convert(capsys, source, out, "--kernel-size", "0")
    assert code == 2 and "--kernel-size" in err


def test_help_names_every_flag(capsys):
    assert main(["convert", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--attention", "--preset", "--reduction", "--kernel-size", "--pool-types", "--arrangement"):
        assert flag in text
    assert "ultralytics" in text


def test_recorded_options_the_tensors_do_not_show_must_match_the_model(tmp_path, capsys):
    """A file converted for pool_types=('max',) loads only into a model built with them: another model would take
    the weights and compute another function."""
    model = randomise_(cbam.models.create_model("resnet18", attention="cbam", num_classes=4, pool_types=("max",)))
    save_weights(tmp_path / "a.safetensors", model, {"model": "resnet18", "attention": "cbam"})
    code, out, _ = convert(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--pool-types", "max")
    assert code == 0
    with pytest.raises(ValueError, match=r"made for pool_types=\('max',\), the model has pool_types=\('avg', 'max'\)"):
        cbam.create_model("resnet18", attention="cbam", num_classes=4, checkpoint=tmp_path / "b.safetensors")
    loaded = cbam.create_model("resnet18", attention="cbam", num_classes=4, pool_types=("max",),
                               checkpoint=tmp_path / "b.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
