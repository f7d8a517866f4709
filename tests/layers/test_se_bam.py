"""SE and BAM against hand-computed values; the attention factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam import BAM, CBAM, SE, create_attn, get_attn
from cbam.layers import attention_name


def test_se_matches_hand_computation():
    se = SE(2, hidden=1)
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([[1.0, 1.0]]))
        se.fc1.bias.zero_()
        se.fc2.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        se.fc2.bias.copy_(torch.tensor([0.0, 0.5]))
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])  # avg = (2, 2) -> hidden 4 -> logits (4, -3.5)
    expected = x * torch.sigmoid(torch.tensor([4.0, -3.5]))[None, :, None, None]
    torch.testing.assert_close(se(x), expected)


def test_se_is_cbam_channel_gate_with_avg_pool():
    torch.manual_seed(0)
    se = SE(32)
    c = CBAM(32, pool_types=["avg"], spatial=False)
    c.channel.fc1.load_state_dict(se.fc1.state_dict())
    c.channel.fc2.load_state_dict(se.fc2.state_dict())
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(se(x), c(x))


def test_se_gradcheck():
    se = SE(8, 2).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(se, (x,))


def test_bam_adds_the_branches_as_the_paper_says():
    torch.manual_seed(1)
    bam = BAM(32).eval()
    x = torch.randn(2, 32, 9, 9)
    channel = bam.channel(x.mean((2, 3)))[:, :, None, None]
    spatial = bam.spatial(x)
    assert channel.shape == (2, 32, 1, 1) and spatial.shape == (2, 1, 9, 9)
    torch.testing.assert_close(bam(x), x * (1 + torch.sigmoid(channel + spatial)))


def test_bam_with_zero_weights_scales_by_one_and_a_half():
    bam = BAM(16, 4).eval()
    for p in bam.parameters():
        nn.init.zeros_(p)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(bam(x), 1.5 * x)


def test_bam_spatial_branch_is_dilated():
    bam = BAM(64, dilation=4)
    dilated = [m for m in bam.spatial if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(dilated) == 2 and all(m.dilation == (4, 4) and m.padding == (4, 4) for m in dilated)


def test_bam_gradcheck():
    torch.manual_seed(2)
    bam = BAM(8, 2, dilation=1).double().eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(bam, (x,))


@pytest.mark.parametrize("module", [SE(16, 4), BAM(16, 4)])
def test_bad_input_names_the_module(module):
    with pytest.raises(ValueError, match=f"{type(module).__name__}: expected 16 channels, got 3"):
        module(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        module(torch.ones(2, 16, 4, 4, dtype=torch.int32))


def test_factory():
    assert get_attn(None) is None and get_attn("none") is None
    assert get_attn("cbam") is CBAM and get_attn("SE") is SE and get_attn(BAM) is BAM
    m = create_attn("cbam", 64, reduction=8, kernel_size=3)
    assert isinstance(m, CBAM) and m.channel.hidden == 8 and m.spatial.kernel_size == 3
    assert create_attn(None, 64) is None
    assert attention_name("CBAM") == "cbam" and attention_name(None) == "none"
    with pytest.raises(ValueError, match="unknown attention 'eca'"):
        get_attn("eca")
    with pytest.raises(TypeError):
        get_attn(3)
