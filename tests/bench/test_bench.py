"""``cbam bench`` runs end to end on tiny cases and reports what it measured (correctness only, no timing)."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F

from cbam import create_model
from cbam.bench.runner import saved_bytes
from cbam.cli import main
from cbam.fused import native


def test_bench_tiny_run_writes_json_and_ratio_tables(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--allocator", "current", "--shapes", "2x32x8x8", "--network", "cifar_resnet20",
                 "--network-batch", "2", "--network-size", "32", "--no-compile", "--rounds", "5", "--min-seconds", "0",
                 "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("machine", "torch", "device", "threads", "allocator", "cases", "memory"):
        assert key in result
    names = set(result["cases"])
    for variant in ("cbam-reference", "cbam-fused", "se"):
        assert f"module/2x32x8x8/float32/fwd/{variant}" in names
        assert f"module/2x32x8x8/float32/fwd+bwd/{variant}" in names
    assert "module/2x32x8x8/float32/copy" in names
    assert result["fused_cpu_kernels"] == native.native_status()  # "loaded" where a C++ compiler is
    for variant in ("plain", "se", "cbam-reference", "cbam-fused", "cbam-fused-no-tail", "cbam-fused-memory-efficient"):
        assert f"network/cifar_resnet20/train-step/{variant}" in names
        assert result["memory"][variant]["saved_bytes"] > 0
    md = out.with_suffix(".md").read_text()
    assert "x copy" in md and "x plain" in md and "saved for backward" in md
    assert f"Fused CPU kernels: {native.native_status()}" in md
    assert "allocator" in capsys.readouterr().out


@pytest.mark.compiler
def test_every_compiled_module_case_compiles(tmp_path):
    """The compiled module cases share one forward (two graphs per module here: with and without gradients); with
    Dynamo's recompilation limit at 1, they still all compile (the bench raises the limit, and a hit would be an
    error, not a silent fall-back to eager code under a "compiled" label)."""
    import torch._dynamo

    torch._dynamo.reset()
    out = tmp_path / "bench.json"
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        assert main(["bench", "--allocator", "current", "--shapes", "2x32x8x8", "--no-networks", "--rounds", "5",
                     "--min-seconds", "0", "--output", str(out)]) == 0
    names = set(json.loads(out.read_text())["cases"])
    for variant in ("cbam-fused-compiled", "se-compiled"):
        for mode in ("fwd", "fwd+bwd"):
            assert f"module/2x32x8x8/float32/{mode}/{variant}" in names


def test_saved_bytes_counts_each_storage_once():
    model = create_model("cifar_resnet20", num_classes=10)
    import torch

    x = torch.randn(2, 3, 32, 32)
    once = saved_bytes(lambda: F.cross_entropy(model(x), torch.tensor([1, 2])).backward())
    assert 0 < once < 50e6


def test_bench_bad_input(capsys):
    assert main(["bench", "--allocator", "current", "--dtypes", "fp8"]) == 2
    assert "--dtypes" in capsys.readouterr().err
