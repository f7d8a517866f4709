"""What is refused, in one line naming the file and the first keys and shapes: foreign tensors, wrong shapes, damaged
files, anything but tensors, and pickles that carry code (refused by weights_only, never run)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import cbam
from cbam.convert import convert_state_dict, load_into, to_cbam_layout
from cbam.train.checkpoint import save_weights


def refused(model: torch.nn.Module, path, *words: str) -> str:
    with pytest.raises(ValueError) as info:
        load_into(model, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def resnet18():
    return cbam.models.create_model("resnet18", attention="cbam")


class MakesADirectory:
    """Unpickling this calls os.mkdir(path): a stand-in for any code a pickle can run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickle_that_runs_code_is_refused_not_run(tmp_path, resnet18):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": MakesADirectory(str(marker))}, path)
    refused(resnet18, path, "weights_only=True", "neither safetensors nor a torch file")
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"  # a bare pickle, not torch's zip format
    raw.write_bytes(pickle.dumps(MakesADirectory(str(marker)), protocol=2))
    refused(resnet18, raw, "weights_only=True")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really carries code: unrestricted unpickling runs it
    assert marker.is_dir()


def test_random_tensors_are_no_known_layout(tmp_path, resnet18):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"blob{i}.weight": torch.randn(3, 4, generator=gen) for i in range(5)}
    save_file(tensors, tmp_path / "random.safetensors")
    torch.save(tensors, tmp_path / "random.pt")
    for name in ("random.safetensors", "random.pt"):
        refused(resnet18, tmp_path / name, "not a checkpoint layout this package knows", "blob0.weight")


def test_wrong_shapes_name_the_first_keys_and_shapes(tmp_path, resnet18):
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(sd, tmp_path / "tv10.pth")
    refused(resnet18, tmp_path / "tv10.pth", "do not fit resnet18 (attention cbam)",
            "shape of fc.weight [10, 512] in the checkpoint, [1000, 512] in the model")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "tv50.pth")
    message = refused(resnet18, tmp_path / "tv50.pth", "unexpected layer1.0.bn3.bias")
    assert "(+" in message  # the rest is counted, not listed
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    assert all(torch.equal(v, resnet18.state_dict()[k]) for k, v in before.items())  # nothing was loaded


def test_attention_weights_into_a_plain_model_say_what_to_do(tmp_path, resnet18):
    path = save_weights(tmp_path / "m.safetensors", resnet18, {"model": "resnet18", "attention": "cbam"})
    refused(cbam.models.create_model("resnet18"), path, "build the model with attention='cbam'")


def test_damaged_files(tmp_path, resnet18):
    path = save_weights(tmp_path / "m.safetensors", resnet18, {"model": "resnet18", "attention": "cbam"})
    data = bytearray(path.read_bytes())
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    refused(resnet18, tmp_path / "cut.safetensors", "corrupt or truncated")
    data[-100] ^= 0x01
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    refused(resnet18, tmp_path / "flipped.safetensors", "failed their integrity check")
    (tmp_path / "notes.txt").write_text("not weights\n")
    refused(resnet18, tmp_path / "notes.txt", "neither safetensors nor a torch file")
    refused(resnet18, tmp_path / "missing.pth", "does not exist")


def test_anything_but_tensors_is_refused(tmp_path, resnet18):
    torch.save({"state_dict": {"conv1.weight": "abc"}}, tmp_path / "str.pth")
    refused(resnet18, tmp_path / "str.pth", "entry 'conv1.weight' is a str")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    refused(resnet18, tmp_path / "list.pth", "holds a list; expected a state dict")
    torch.save({}, tmp_path / "empty.pth")
    refused(resnet18, tmp_path / "empty.pth", "empty")


def test_unknown_keys_of_a_known_layout_are_refused(resnet18):
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.cbam.ChannelGate.mlp.2.weight": torch.zeros(4),
          "layer1.0.cbam.SpatialGate.spatial.conv.weight": torch.zeros(1, 2, 7, 7)}
    with pytest.raises(ValueError, match=r"layer1\.0\.cbam\.ChannelGate\.mlp\.2\.weight: not a key of the authors'"):
        to_cbam_layout(sd, "release")
    bad_spatial = {"layer1.0.cbam.SpatialGate.spatial.conv.weight": torch.zeros(1, 3, 7, 7)}
    with pytest.raises(ValueError, match=r"expected the spatial conv weight \[1, 2, k, k\], got \[1, 3, 7, 7\]"):
        to_cbam_layout(bad_spatial, "release")
    with pytest.raises(TypeError, match="expected a state dict"):
        convert_state_dict([1, 2], resnet18)
