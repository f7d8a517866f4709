"""MobileNet v1: structure, width rounding, where attention sits (inferred from CBAM Table 5's counts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam.layers import BAM, CBAM, SE
from cbam.models import create_model
from cbam.models.mobilenet import DepthwiseSeparable


def _meta(**kwargs):
    with torch.device("meta"):
        return create_model("mobilenet_v1", **kwargs)


def test_structure():
    model = _meta()
    blocks = list(model.blocks)
    assert len(blocks) == 13 and all(isinstance(b, DepthwiseSeparable) for b in blocks)
    assert model.conv_stem.out_channels == 32 and model.conv_stem.stride == (2, 2)
    assert [b.conv_pw.out_channels for b in blocks] == [64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    assert [b.conv_dw.stride[0] for b in blocks] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert all(b.conv_dw.groups == b.conv_dw.in_channels for b in blocks)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.fc.in_features == 1024


def test_width_07_truncates():
    """int(c * 0.7): the rounding that reproduces Table 5's 2.30M / 0.283 GMACs."""
    model = _meta(width_mult=0.7)
    assert model.conv_stem.out_channels == 22
    assert [b.conv_pw.out_channels for b in model.blocks] == [44, 89, 89, 179, 179] + [358] * 6 + [716, 716]


@pytest.mark.parametrize(("attention", "cls"), [("se", SE), ("cbam", CBAM)])
def test_attention_after_every_conv_bn(attention, cls):
    model = _meta(attention=attention)
    assert isinstance(model.attn_stem, cls) and model.attn_stem.channels == 32
    for b in model.blocks:
        assert isinstance(b.attn_dw, cls) and b.attn_dw.channels == b.conv_dw.out_channels
        assert isinstance(b.attn_pw, cls) and b.attn_pw.channels == b.conv_pw.out_channels
    assert sum(isinstance(m, cls) for m in model.modules()) == 27
    assert len(_meta(attention=attention, stem_attn=False).state_dict()) < len(model.state_dict())


def test_attention_after_bn_before_relu():
    torch.manual_seed(0)
    model = create_model("mobilenet_v1", attention="cbam", num_classes=10).eval()
    block = model.blocks[1]
    seen = {}
    block.bn_dw.register_forward_hook(lambda m, i, o: seen.__setitem__("bn_dw", o.clone()))
    block.attn_dw.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", (i[0].clone(), o.clone())))
    block.act_dw.register_forward_hook(lambda m, i, o: seen.__setitem__("act_dw_in", i[0].clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    attn_in, attn_out = seen["attn"]
    torch.testing.assert_close(attn_in, seen["bn_dw"])
    torch.testing.assert_close(seen["act_dw_in"], attn_out)


def test_hidden_rounding():
    """Table 5's SE at width 0.7 (2.71M) needs hidden = round(C / 16): 716 channels -> 45, not 44."""
    assert _meta(attention="se", width_mult=0.7).blocks[12].attn_pw.hidden == 45
    assert _meta(attention="se", width_mult=0.7, attn_hidden_rounding="floor").blocks[12].attn_pw.hidden == 44
    assert _meta(attention="cbam", width_mult=0.7).blocks[12].attn_pw.channel.hidden == 45
    # An explicit width wins; thin networks get at least one hidden unit instead of an error.
    assert _meta(attention="se", width_mult=0.7, hidden=3).blocks[12].attn_pw.hidden == 3
    thin = _meta(attention="cbam", width_mult=0.25, attn_hidden_rounding="floor")
    assert thin.attn_stem.channels == 8 and thin.attn_stem.channel.hidden == 1


def test_bam_before_each_stride_2_block():
    model = _meta(attention="bam")
    bams = [getattr(model, f"bam{i}") for i in (1, 2, 3, 4)]
    assert all(isinstance(b, BAM) for b in bams)
    assert [b.channels for b in bams] == [64, 128, 256, 512]
    assert model._bam_after == {0: "bam1", 2: "bam2", 4: "bam3", 10: "bam4"}
    assert isinstance(model.attn_stem, nn.Identity)
    assert all(isinstance(b.attn_dw, nn.Identity) for b in model.blocks)
