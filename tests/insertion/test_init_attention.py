"""cbam.init_attention: a network built with attention starts as exactly the network without it (identity), which
is what cbam train does by default (attention_init)."""

from __future__ import annotations

import pytest
import torch

import cbam
from cbam.layers import CBAM, SE
from cbam.models import create_model
from cbam.train.config import TrainConfig
from cbam.train.engine import _setup

pytestmark = pytest.mark.usefixtures("single_thread")


def _without_attention(model, name, scale):
    """The plain network computing what ``model`` computes once its gates are undone (bn2 divided back)."""
    plain = create_model(name, attention=None, num_classes=10)
    own = plain.state_dict()
    state = {}
    for key in own:
        value = model.state_dict()[key].clone()
        if ".bn2." in key and key.rsplit(".", 1)[-1] in ("weight", "bias"):
            value /= scale
        state[key] = value
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize("attention, module, scale", [("cbam", CBAM, 4.0), ("se", SE, 2.0)])
def test_identity_start_is_exactly_the_plain_network(attention, module, scale):
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", attention=attention, num_classes=10)
    paths = cbam.init_attention(model)
    assert paths == ["layer1.0.attn", "layer2.0.attn", "layer3.0.attn"]
    assert all(isinstance(model.get_submodule(p), module) for p in paths)
    plain = _without_attention(model, "cifar_resnet8", scale)
    x = torch.randn(3, 3, 32, 32)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))
    model.train(), plain.train()
    assert torch.equal(model(x), plain(x))
    # the zeroed gate layers still learn: their gradients are not zero
    model(x).square().mean().backward()
    lasts = [m.channel.fc2 if attention == "cbam" else m.fc2 for m in map(model.get_submodule, paths)]
    assert sum(float(last.weight.grad.abs().sum()) for last in lasts) > 0


def test_paper_init_reruns_the_modules_own_and_bad_init_is_refused():
    model = create_model("cifar_resnet8", attention="cbam")
    before = model.layer1[0].bn2.weight.clone()
    cbam.init_attention(model, "paper")
    assert torch.equal(model.layer1[0].bn2.weight, before)
    assert model.layer1[0].attn.channel.fc2.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="init must be one of identity, paper"):
        cbam.init_attention(model, "zero")


def test_train_starts_from_identity_by_default_and_paper_on_request(tmp_path):
    base = dict(model="cifar_resnet8", attention="cbam", dataset="synthetic", image_size=32, synthetic_train_size=16,
                synthetic_val_size=8, batch_size=8, epochs=1, progress=False, tensorboard=False, workers=0)
    from cbam.train import distributed as D

    info = D.setup("cpu")
    run = _setup(TrainConfig(**base, output=str(tmp_path / "a")), info, None)
    assert run.model.layer1[0].attn.channel.fc2.weight.abs().sum() == 0  # identity: gates constant 1/2
    run = _setup(TrainConfig(**base, attention_init="paper", output=str(tmp_path / "b")), info, None)
    assert run.model.layer1[0].attn.channel.fc2.weight.abs().sum() > 0
