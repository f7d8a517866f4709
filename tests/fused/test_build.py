"""Building the CPU kernels: only when a CPU computation needs them, once per machine and environment, one builder at a
time without stale locks, and a clean fall-back to the reference path without a compiler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cbam
from cbam.fused import function, native
from cbam.layers import dispatch

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_import_and_construction_do_not_build():
    result = _python(
        """
        import torch, cbam
        from cbam.fused import native
        cbam.CBAM(64); cbam.create_model("resnet18", attention="cbam")
        print(native.native_status())
        print(hasattr(torch.ops, "cbam_cpu") and hasattr(torch.ops.cbam_cpu, "forward_inference"))
        """
    )
    assert result.returncode == 0, result.stderr
    status, ops_loaded = result.stdout.strip().splitlines()
    assert status.startswith("not built yet") and ops_loaded == "False"


def test_a_model_off_the_cpu_never_builds(monkeypatch):
    """Only the CPU has a kernel in the dispatch table; a CUDA (here: meta, and a mocked CUDA) map never reaches the
    build."""

    def refuse() -> str:
        raise AssertionError("the CPU kernels were built for a map that is not on the CPU")

    monkeypatch.setattr(native, "load", refuse)
    assert set(dispatch.registered_kernels()) == {"cpu"}
    with torch.device("meta"):
        model = cbam.create_model("resnet18", attention="cbam", num_classes=3)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    cuda_map = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert dispatch.kernel_for(cuda_map) is None  # type: ignore[arg-type]
    assert function.serves(cuda_map) is False  # type: ignore[arg-type]


def test_without_a_compiler_the_reference_path_runs_with_one_warning(tmp_path):
    result = _python(
        """
        import warnings, torch, cbam
        from cbam.fused import native
        m = cbam.CBAM(16, 4)
        x = torch.randn(2, 16, 6, 6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = m(x)
            y = m(x)
        print(len([w for w in caught if "reference path" in str(w.message)]))
        print(torch.equal(y, m.forward_reference(x)))
        print(native.native_status())
        """,
        env={"CBAM_EXTENSIONS_DIR": str(tmp_path / "empty"), "CXX": "/bin/false", "CC": "/bin/false"},
    )
    assert result.returncode == 0, result.stderr
    warnings_count, equal, status = result.stdout.strip().splitlines()
    assert warnings_count == "1" and equal == "True"
    assert status.startswith("could not build the CPU kernels"), status


def test_disabled_by_environment():
    result = _python(
        """
        import torch, cbam
        from cbam.fused import native
        print(native.ready(), native.native_status())
        """,
        env={"CBAM_NATIVE": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False disabled by CBAM_NATIVE=0"


def test_the_build_folder_is_keyed_by_torch_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CBAM_EXTENSIONS_DIR", str(tmp_path))
    first = native.build_directory()
    assert first.parent == tmp_path and first.name.startswith("cbam_cpu_")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other_version = native.build_directory()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "another-venv" / "torch" / "__init__.py"))
    other_place = native.build_directory()
    assert len({first, other_version, other_place}) == 3


_HOLD = """
import sys, time
from pathlib import Path
from cbam.fused import native
with native.exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(directory: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_one_builder_at_a_time(tmp_path):
    holder = _holder(tmp_path, 1.5)
    start = time.perf_counter()
    with native.exclusive(tmp_path):
        waited = time.perf_counter() - start
    holder.wait(timeout=30)
    assert waited > 0.8, waited


def test_a_killed_builder_leaves_no_lock_behind(tmp_path):
    holder = _holder(tmp_path, 600)
    (tmp_path / "lock").write_text("")  # what torch's own builder leaves when killed mid-build
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    start = time.perf_counter()
    with native.exclusive(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_concurrent_processes_build_once_and_all_load(tmp_path, native):
    """torchrun's ranks start together: one builds, the others wait for its result (a real build, about a minute)."""
    code = textwrap.dedent(
        """
        import torch, cbam
        m = cbam.CBAM(16, 4)
        x = torch.randn(2, 16, 5, 5)
        out = m(x)
        from cbam.fused import native
        print(native.native_status(), torch.allclose(out, m.forward_reference(x), atol=1e-6))
        """
    )
    env = {**os.environ, "CBAM_EXTENSIONS_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["loaded True"] * 3
    builds = [err for _, err in outputs if "compiled the CPU kernels" in err]
    assert len(builds) >= 1
    assert len(list(tmp_path.glob("cbam_cpu_*/*.so"))) == 1


def test_a_model_compiled_before_any_eager_call_builds_and_uses_the_kernels(native):
    """Under torch.compile the build runs once while the graph is traced (no graph break), and the graph calls the
    kernels."""
    result = _python(
        """
        import torch, cbam
        from cbam.fused import native
        m = cbam.CBAM(16, 4).eval()
        x = torch.randn(2, 16, 5, 5)
        seen = []
        def backend(gm, inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes)
            return gm.forward
        with torch.no_grad():
            out = torch.compile(m, fullgraph=True, backend=backend)(x)
        print(native.native_status(), any("cbam_cpu" in t for t in seen), torch.allclose(out, m.forward_reference(x)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded True True"
