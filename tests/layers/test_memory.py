"""memory_efficient=True: same numbers, BatchNorm statistics updated once, nothing more kept than plain."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cbam import create_model
from cbam.bench.runner import saved_bytes
from cbam.layers.fused_cpu import native_available


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18_cifar"])
def test_same_outputs_gradients_and_running_stats(name):
    torch.manual_seed(0)
    base = create_model(name, attention="cbam", num_classes=10)
    lean = create_model(name, attention="cbam", num_classes=10, memory_efficient=True)
    lean.load_state_dict(base.state_dict())
    for m in list(base.modules()) + list(lean.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):  # make the spatial gates' BN matter for the gradients
            torch.nn.init.constant_(m.weight, 0.7)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss_a, grads_a = _step(base, x, y)
    loss_b, grads_b = _step(lean, x, y)
    torch.testing.assert_close(loss_a, loss_b)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6, msg=k)
    for (k, a), b in zip(base.state_dict().items(), lean.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)  # running stats and num_batches_tracked: updated exactly once


def test_saves_no_more_than_the_plain_network_plus_a_few_percent():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    sizes = {}
    variants = {
        "plain": {},
        "cbam": {"attention": "cbam"},
        "separate": {"attention": "cbam", "fuse_residual": False},
        "lean": {"attention": "cbam", "memory_efficient": True},
    }
    for label, kwargs in variants.items():
        model = create_model("cifar_resnet20", num_classes=10, **kwargs)
        sizes[label] = saved_bytes(lambda m=model: F.cross_entropy(m(x), y).backward())
    assert sizes["lean"] <= 1.05 * sizes["plain"] < sizes["separate"]
    if native_available():  # the last BatchNorm folded into the kernels: its output is never kept
        assert sizes["cbam"] <= 1.06 * sizes["plain"] < sizes["separate"]


def test_inference_and_eval_unchanged():
    torch.manual_seed(1)
    base = create_model("cifar_resnet20", attention="cbam", num_classes=10).eval()
    lean = copy.deepcopy(base)
    for m in lean.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(base(x), lean(x))
