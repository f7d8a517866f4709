"""``cbam.fuse(model, memory_efficient=True)``: the last BatchNorm and CBAM of each block recomputed in backward; the
same numbers, BatchNorm statistics updated once, nothing more kept than the plain network. Works with or without the
CPU kernels, and for CBAM configurations they do not compute."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fused_helpers import saved_bytes

from cbam import create_model, fuse
from cbam.fused import native
from cbam.layers import reference_only


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_step(a, b, rtol=1e-4, atol=1e-6):
    """Same loss and gradients after one step, and the same state (running statistics, num_batches_tracked)."""
    (model_a, (loss_a, grads_a)), (model_b, (loss_b, grads_b)) = a, b
    torch.testing.assert_close(loss_a, loss_b)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=rtol, atol=atol, msg=k)
    for (k, s), t in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(s, t, msg=k)  # running stats and num_batches_tracked: updated exactly once


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18_cifar"])
def test_same_outputs_gradients_and_running_stats(name):
    """One training step of the unfused network on the reference path, of its fused copy and of its memory-efficient
    fused copy."""
    torch.manual_seed(0)
    base = create_model(name, attention="cbam", num_classes=10)
    for m in base.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # make the spatial gates' BN matter for the gradients
            torch.nn.init.constant_(m.weight, 0.7)
    fused, lean = copy.deepcopy(base), copy.deepcopy(base)
    assert fuse(fused) == fuse(lean, memory_efficient=True) != []
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with reference_only():
        expected = (base, _step(base, x, y))
    _assert_same_step(expected, (fused, _step(fused, x, y)))
    _assert_same_step(expected, (lean, _step(lean, x, y)))


def test_saves_no_more_than_the_plain_network_plus_a_few_percent():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    sizes = {}
    variants = {"plain": {}, "unfused": {}, "fused": {"memory_efficient": False}, "lean": {"memory_efficient": True}}
    for label, fuse_kwargs in variants.items():
        model = create_model("cifar_resnet20", num_classes=10, attention=None if label == "plain" else "cbam")
        if fuse_kwargs:
            assert fuse(model, **fuse_kwargs)
        sizes[label] = saved_bytes(lambda m=model: F.cross_entropy(m(x), y).backward())
    assert sizes["lean"] <= 1.05 * sizes["plain"] < sizes["unfused"]
    if native.load() is None:  # the last BatchNorm folded into the kernels: its output is never kept
        assert sizes["fused"] <= 1.06 * sizes["plain"] < sizes["unfused"]


def test_inference_and_eval_unchanged():
    torch.manual_seed(1)
    base = create_model("cifar_resnet20", attention="cbam", num_classes=10).eval()
    lean = copy.deepcopy(base)
    fuse(lean, memory_efficient=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(base(x), lean(x))


def test_configurations_the_kernels_do_not_compute_are_recomputed_too():
    """A CBAM the kernels do not compute (the parallel arrangement) leaves the blocks unfused, unless
    memory_efficient: then they recompute it in backward, with the same numbers and less kept."""
    torch.manual_seed(2)
    base = create_model("cifar_resnet20", attention="cbam", num_classes=10, arrangement="parallel")
    assert fuse(copy.deepcopy(base)) == []
    lean = copy.deepcopy(base)
    assert len(fuse(lean, memory_efficient=True)) == 9
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _assert_same_step((base, _step(base, x, y)), (lean, _step(lean, x, y)))
    kept = {
        label: saved_bytes(lambda m=m: F.cross_entropy(m(x), y).backward())
        for label, m in [("base", base), ("lean", lean)]
    }
    assert kept["lean"] < 0.8 * kept["base"]
