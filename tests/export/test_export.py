"""Export to ONNX, TorchScript and torch.export programs: parity of the written files at several batches and image
sizes, plain reductions in the ONNX graph, no fused-kernel operator in any graph (fused models included), the
dispatch's export switch, and nothing written when the check fails."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from export_helpers import BATCHES, SIZES, Tiny, max_difference, randomise, resnet18, tiny_fused
from torch import nn

import cbam
from cbam.export import FORMATS, default_check_size, export_model, load_runner, operators
from cbam.fused import native
from cbam.fused.function import cpu_kernel
from cbam.layers import dispatch
from cbam.train.determinism import OpRecorder

TOLERANCE = 1e-4
ADAPTIVE_OR_GLOBAL = ("GlobalAveragePool", "GlobalMaxPool", "AveragePool", "GlobalLpPool", "LpPool", "MaxRoiPool")


pytestmark = pytest.mark.usefixtures("single_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return resnet18()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict:
    """ResNet-18 with CBAM written once in each format (traced at 64 x 64), with the reports."""
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for fmt in FORMATS:
        path = folder / f"resnet18.{fmt}"
        out[fmt] = (path, export_model(model, path, fmt, image_size=(64, 64)))
    return out


def _kernels_or_skip() -> None:
    reason = native.load()
    if reason is not None:
        pytest.skip(f"the CPU kernels are not available here: {reason}")


# ---------------------------------------------------------------------------------------------------------- parity
def test_onnx_matches_onnxruntime_at_three_batches_and_two_sizes(model, exported):
    path, report = exported["onnx"]
    assert report.opset == 18 and report.max_abs_error <= TOLERANCE and report.bytes == path.stat().st_size
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    error = max_difference(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), model)
    assert error <= TOLERANCE
    # and a third size, not one the export checked: the last feature map 1 x 1 (32 px) and a wide image
    error = max_difference(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), model,
                           sizes=((32, 32), (40, 97)), batches=(1, 4))
    assert error <= TOLERANCE


def test_onnx_graph_has_dynamic_named_axes_and_opset_18(exported):
    proto = onnx.load(str(exported["onnx"][0]))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["batch", 10]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    onnx.checker.check_model(proto)


def test_onnx_pools_are_plain_reductions(exported):
    ops = operators("onnx", exported["onnx"][0])
    assert {"ReduceMean", "ReduceMax", "Conv", "Sigmoid", "MaxPool"} <= ops  # CBAM's pools, the stem's max pool
    assert not ops & set(ADAPTIVE_OR_GLOBAL), ops
    assert all("::" not in op for op in ops), ops  # standard ONNX domain only


def test_the_classifier_head_is_a_mean_and_the_state_dict_unchanged():
    """The heads once were nn.AdaptiveAvgPool2d(1): same keys, same numbers, now a plain mean."""
    for name, size in (("resnet18", 64), ("cifar_resnet20", 32), ("mobilenet_v1", 64)):
        model = cbam.create_model(name, num_classes=3)
        head = model.global_pool if name == "mobilenet_v1" else model.avgpool
        assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
        assert not list(head.state_dict())
        x = torch.randn(2, 7, size // 8, size // 8 + 3)
        assert torch.equal(head(x), nn.AdaptiveAvgPool2d(1)(x))


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_reloaded_file_matches_the_model(model, exported, fmt):
    path, report = exported[fmt]
    assert report.max_abs_error <= TOLERANCE and report.image_sizes == SIZES == ((64, 64), default_check_size((64, 64)))
    assert report.batch_sizes == (1, 2, 3) and report.bytes == path.stat().st_size
    run, ops = load_runner(fmt, path.read_bytes())
    # one more batch and size than the export checked itself
    assert max_difference(lambda x: run(x)[0], model, sizes=((40, 72),), batches=(4,)) <= TOLERANCE
    if fmt == "torchscript":  # the last feature map 1 x 1, which the exported program's guards refuse (docs/export.md)
        assert max_difference(lambda x: run(x)[0], model, sizes=((32, 32),), batches=(1,)) <= TOLERANCE
    assert not any("adaptive" in op for op in ops), ops
    assert {"aten::amax", "aten::mean", "aten::sigmoid"} <= ops
    assert set(report.operators) == ops


def test_exported_program_keeps_batch_height_and_width_symbolic(exported):
    program = torch.export.load(str(exported["exported-program"][0]))
    inputs = program.graph_signature.user_inputs
    (node,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in inputs]
    assert [isinstance(d, torch.SymInt) for d in node.meta["val"].shape] == [True, False, True, True]


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_graph_calls_the_fused_kernels(exported, fmt):
    path, report = exported[fmt]
    ops = operators(fmt, path) if fmt == "onnx" else set(report.operators)  # the report's: read from the file
    assert ops and not any("cbam_cpu" in op for op in ops), ops


# ------------------------------------------------------------------------------------------- dispatch while exporting
class _Probe(nn.Module):
    """Returns 2x where the dispatch gives CBAM's CPU kernel, x where it gives none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 if dispatch.kernel_for(x) is None else 2.0)


def test_kernel_for_gives_none_while_tracing_or_exporting_but_not_under_torch_compile():
    probe, x = _Probe(), torch.ones(2, 3)
    assert dispatch.kernel_for(x) is cpu_kernel and not dispatch.exporting()
    assert float(probe(x)[0, 0]) == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(probe, x, check_trace=False)
        program = torch.export.export(probe, (x,))
        onnx_program = torch.onnx.export(probe, (x,), dynamo=True, verbose=False)
    assert float(traced(x)[0, 0]) == 1.0
    assert float(program.module()(x)[0, 0]) == 1.0
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString())
    assert float(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0][0, 0]) == 1.0
    assert float(torch.compile(probe, backend="eager", fullgraph=True)(x)[0, 0]) == 2.0


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", pytest.param("exported-program", marks=pytest.mark.slow)])
def test_a_fused_model_exports_through_the_reference_path(fmt, tmp_path):
    _kernels_or_skip()
    plain, fused = tiny_fused()
    x = torch.randn(2, 3, 24, 24)
    recorder = OpRecorder()
    with torch.no_grad(), recorder:
        eager = fused(x)
    assert any(op.startswith("cbam_cpu::") for op in recorder.calls)  # eager: the kernels run
    torch.testing.assert_close(eager, plain(x), rtol=1e-5, atol=1e-5)
    report = export_model(fused, tmp_path / "tiny", fmt, image_size=(24, 24), batch_sizes=BATCHES)
    assert report.max_abs_error <= TOLERANCE
    ops = operators(fmt, tmp_path / "tiny")
    assert not any("cbam_cpu" in op for op in ops), ops
    run, _ = load_runner(fmt, (tmp_path / "tiny").read_bytes())
    assert max_difference(lambda t: run(t)[0], plain, sizes=((24, 24), (17, 31))) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------- failures
class _ShapeBranch(nn.Module):
    """A model whose result depends on the image size through Python: a trace or export at 64 px cannot be right
    at 49 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if x.shape[-2] > 56:
            y = y * 2
        return y.mean(dim=(2, 3))


class _FixedBatch(nn.Module):
    """A model that turns its batch size into a Python int: traced or exported, the example's batch is baked in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.reshape(int(y.shape[0]), -1).mean(dim=1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_check_writes_nothing_and_keeps_the_old_file(fmt, tmp_path):
    path = tmp_path / "model.out"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match=f"^{fmt} export: ") as info:
        export_model(_ShapeBranch(), path, fmt, image_size=(64, 64))
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.out"]  # no temporary file left


@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_a_dimension_the_export_fixed_is_refused(fmt, tmp_path):
    """Depending on where torch.export records it, a fixed batch is a static input dimension (named at export) or a
    guard / a baked constant (found by the comparison at batch 1)."""
    with pytest.raises(ValueError, match=f"^{fmt} export: .*(batch is fixed to 2|at batch 1, 8x8 pixels)"):
        export_model(_FixedBatch(), tmp_path / "m", fmt, image_size=(8, 8))
    assert not (tmp_path / "m").exists()


def test_torchscript_fixed_batch_fails_the_comparison(tmp_path):
    with pytest.raises(ValueError, match=r"output shapes \[\(2,\)\] differ from the model's \[\(1,\)\] at batch 1"):
        export_model(_FixedBatch(), tmp_path / "m", "torchscript", image_size=(8, 8))
    assert not list(tmp_path.iterdir())


def test_a_tolerance_of_zero_can_fail(tmp_path):
    """The comparison is real: ONNX Runtime's float32 arithmetic is not bit-identical to PyTorch's."""
    module = randomise(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), cbam.CBAM(32, 8)))
    with pytest.raises(ValueError, match="differs from the model by up to .* expected at most 0$"):
        export_model(module, tmp_path / "m.onnx", "onnx", image_size=(20, 20), tolerance=0.0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "tflite"}, "unknown export format 'tflite'; expected one of onnx, torchscript, exported-program"),
        ({"opset": 17}, "opset must be an integer >= 18, got 17"),
        ({"image_size": (0, 8)}, "image_size must be"),
        ({"batch_sizes": ()}, "batch_sizes must be positive integers"),
        ({"batch_sizes": (1, 0)}, "batch_sizes must be positive integers"),
        ({"tolerance": -1.0}, "tolerance must be a finite number >= 0"),
        ({"tolerance": float("nan")}, "tolerance must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(kwargs, message, tmp_path):
    args = {"format": "onnx", "image_size": (8, 8), **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        export_model(_ShapeBranch(), tmp_path / "m", **args)
    assert not list(tmp_path.iterdir())


def test_not_a_module_and_a_directory_are_refused(tmp_path):
    with pytest.raises(TypeError, match="expected an nn.Module"):
        export_model(object(), tmp_path / "m", "onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is a directory"):
        export_model(_ShapeBranch(), tmp_path, "torchscript", image_size=(8, 8))


def test_the_model_keeps_its_training_modes(tmp_path):
    module = Tiny().train()
    module.block2.bn1.eval()  # a frozen BatchNorm stays frozen
    export_model(module, tmp_path / "m.pt", "torchscript", image_size=(16, 16))
    assert [m.training for m in module.modules()] == [m is not module.block2.bn1 for m in module.modules()]


# ------------------------------------------------------------------------------------------- more networks (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18_cifar", "resnet50", "mobilenet_v1", "resnext50_32x4d"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_more_networks_export_and_match(name, fmt, tmp_path):
    torch.manual_seed(0)
    model = randomise(cbam.create_model(name, attention="cbam", num_classes=7))
    size = 32 if name.endswith("cifar") or name.startswith("cifar") else 64
    report = export_model(model, tmp_path / "m", fmt, image_size=(size, size))
    assert report.max_abs_error <= TOLERANCE
    ops = operators(fmt, tmp_path / "m")
    assert not any("cbam_cpu" in op or "adaptive" in op.lower() for op in ops), ops
    if fmt == "onnx":
        assert not ops & set(ADAPTIVE_OR_GLOBAL) and {"ReduceMean", "ReduceMax"} <= ops
        session = onnxruntime.InferenceSession(str(tmp_path / "m"), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((3, 3, size + 5, size - 3)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert np.abs(session.run(None, {session.get_inputs()[0].name: x})[0] - expected).max() <= TOLERANCE

