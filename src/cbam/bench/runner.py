"""``cbam bench``: what CBAM costs next to a plain network and SE, measured side by side in one process.

Every case is timed in interleaved rounds (round 1: every case once, round 2: every case again, ...), so
that the machine's drift hits all variants alike; we report the median and the spread (min-max) of the
rounds, and ratios of medians: module time as a multiple of one ``copy_`` of the same tensor (the
memory-bandwidth yardstick), network time as a multiple of the plain network's. Memory: bytes saved for
backward by one training step, counted through saved-tensor hooks (each storage once), and the peak where
the device reports it (CUDA). Timings are never pass/fail tests; this is the evidence.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CBAM, SE
from ..layers import cbam_fused as fused_module
from ..layers.cbam_fused import cbam_fused
from ..layers.fused_cpu import native_status
from ..models import create_model

MODULE_SHAPES = {
    "full": [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)],
    "quick": [(8, 256, 56, 56), (8, 2048, 7, 7)],
}


@dataclass
class Case:
    name: str  # e.g. "module/32x256x56x56/fp32/fwd/cbam-fused-compiled"
    fn: Callable[[], Any]
    group: str  # cases compared with each other share a group
    times: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, min_seconds: float) -> float:
    """Seconds per call: repeat until ``min_seconds`` have passed (at least once)."""
    _sync(device)
    start = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward during ``step`` (each storage counted once)."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------ cases
class _FusedOnly(nn.Module):
    """CBAM through its fused path even without gradients (without the native CPU kernels the module itself would
    use the reference composition there). ``formulation`` pins one formulation of the fused path for this module's
    calls (``"traced"``: the plain expressions Inductor compiles, instead of the native kernels)."""

    def __init__(self, channels: int, formulation: str | None = None) -> None:
        super().__init__()
        self.cbam = CBAM(channels, implementation="fused")
        self.formulation = formulation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cbam_fused(self.cbam, x)


def _pinned(fn: Callable[[], Any], formulation: str | None) -> Callable[[], Any]:
    """fn with the fused path's formulation pinned while it runs (and compiles)."""
    if formulation is None:
        return fn

    def run():
        previous = fused_module._PATH_OVERRIDE
        fused_module._PATH_OVERRIDE = formulation
        try:
            return fn()
        finally:
            fused_module._PATH_OVERRIDE = previous

    return run


def _module_variants(channels: int, timm_ok: bool, native: bool) -> dict[str, Callable[[], nn.Module]]:
    variants: dict[str, Callable[[], nn.Module]] = {
        "cbam-reference": lambda: CBAM(channels, implementation="reference"),
        "cbam-fused": lambda: _FusedOnly(channels),
        "se": lambda: SE(channels),
    }
    if native:  # compiled, the fused path also has Inductor's own lowering of its plain formulation
        variants["cbam-fused-inductor"] = lambda: _FusedOnly(channels, "traced")
    if timm_ok:
        from timm.layers.cbam import CbamModule

        variants["timm-cbam"] = lambda: CbamModule(channels)
    return variants


def module_cases(shapes, dtypes, device, compile_modules: bool, timm_ok: bool, native: bool) -> list[Case]:
    cases: list[Case] = []
    for shape in shapes:
        for dtype in dtypes:
            tag = f"{'x'.join(map(str, shape))}/{str(dtype).replace('torch.', '')}"
            x = torch.randn(shape, device=device, dtype=dtype)
            y = torch.empty_like(x)
            grad = torch.randn_like(x)
            cases.append(Case(f"module/{tag}/copy", lambda x=x, y=y: y.copy_(x), f"module/{tag}"))
            for name, make in _module_variants(shape[1], timm_ok, native).items():
                module = make().to(device=device, dtype=dtype)
                formulation = getattr(module, "formulation", None)
                runs = [] if formulation else [(name, module)]
                if compile_modules and name != "cbam-reference":
                    runs.append((f"{name}-compiled" if not formulation else name, torch.compile(copy.deepcopy(module))))
                for label, m in runs:
                    xg = x.clone().requires_grad_(True)

                    def fwd(m=m, x=x):
                        with torch.no_grad():
                            return m(x)

                    def fwd_bwd(m=m, xg=xg, grad=grad):
                        m(xg).backward(grad)
                        xg.grad = None

                    cases.append(Case(f"module/{tag}/fwd/{label}", _pinned(fwd, formulation), f"module/{tag}"))
                    cases.append(Case(f"module/{tag}/fwd+bwd/{label}", _pinned(fwd_bwd, formulation), f"module/{tag}"))
    return cases


NETWORK_VARIANTS = {
    "plain": {"attention": None},
    "se": {"attention": "se"},
    "cbam-reference": {"attention": "cbam", "implementation": "reference"},
    "cbam-fused": {"attention": "cbam", "implementation": "fused"},
    # the block's last BatchNorm, addition and ReLU left to the block (what fuse_residual buys, see the README)
    "cbam-fused-no-tail": {"attention": "cbam", "implementation": "fused", "fuse_residual": False},
    "cbam-fused-memory-efficient": {"attention": "cbam", "implementation": "fused", "memory_efficient": True},
}


def _network(variant: str, model: str, device) -> nn.Module:
    torch.manual_seed(0)
    return create_model(model, num_classes=1000, **NETWORK_VARIANTS[variant]).to(device)


def network_cases(model: str, batch: int, size: int, device, compile_networks: bool) -> tuple[list[Case], dict]:
    cases: list[Case] = []
    memory: dict[str, dict[str, int]] = {}
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    for variant in NETWORK_VARIANTS:
        net = _network(variant, model, device)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        compiled_ok = compile_networks and variant in ("plain", "se", "cbam-reference", "cbam-fused")
        for label, m in [(variant, net)] + ([(f"{variant}-compiled", torch.compile(net))] if compiled_ok else []):

            def infer(m=m):
                m.eval()
                with torch.no_grad():
                    return m(x)

            def train_step(m=m, opt=opt):
                m.train()
                F.cross_entropy(m(x), target).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            cases.append(Case(f"network/{model}/inference/{label}", infer, f"network/{model}/inference"))
            cases.append(Case(f"network/{model}/train-step/{label}", train_step, f"network/{model}/train-step"))
        net.train()

        def one_step(net=net):
            F.cross_entropy(net(x), target).backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        memory[variant] = {"saved_bytes": saved_bytes(one_step)}
        if device.type == "cuda":
            memory[variant]["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        net.zero_grad(set_to_none=True)
    return cases, memory


# ------------------------------------------------------------------------------------------ run
def _every_case_compiles(n_cases: int):
    """Compiled cases that share a function (the module cases' forward, at every shape, dtype, gradient mode and
    formulation) each get their own graph: Dynamo's limit of recompilations per function is raised to cover them
    all, and hitting it would be an error rather than a silent fall-back to eager code under a "compiled" label."""
    limit = max(8, 4 * n_cases)
    return torch._dynamo.config.patch(
        recompile_limit=limit,
        accumulated_recompile_limit=max(256, 4 * limit),
        fail_on_recompile_limit_hit=True,
    )


def run_benchmark(
    *,
    device: str = "cpu",
    quick: bool = True,
    shapes: list[tuple[int, int, int, int]] | None = None,
    rounds: int = 5,
    min_seconds: float = 0.2,
    dtypes: tuple[str, ...] = ("fp32",),
    modules: bool = True,
    networks: bool = True,
    network_model: str = "resnet50",
    network_batch: int = 8,
    network_size: int = 224,
    compile_modules: bool = True,
    compile_networks: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every case in ``rounds`` interleaved rounds after one warm-up round; return all figures."""
    dev = torch.device(device)
    dtype_map = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        import timm  # noqa: F401

        timm_ok = True
    except ImportError:
        timm_ok = False
    cases: list[Case] = []
    memory: dict[str, Any] = {}
    fused = native_status() if dev.type == "cpu" else "CUDA: PyTorch operators (eager), Inductor/Triton (compiled)"
    native = fused == "loaded"
    if modules:
        shapes = shapes or MODULE_SHAPES["quick" if quick else "full"]
        cases += module_cases(shapes, [dtype_map[d] for d in dtypes], dev, compile_modules, timm_ok, native)
    if networks:
        net_cases, memory = network_cases(network_model, network_batch, network_size, dev, compile_networks)
        cases += net_cases
    log(f"warming up {len(cases)} cases (compiling where asked) ...")
    with _every_case_compiles(len(cases)):
        for case in cases:
            case.fn()
            case.fn()
        for r in range(rounds):
            for case in cases:
                case.times.append(_timed(case.fn, dev, min_seconds))
            log(f"round {r + 1}/{rounds} done")
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "fused_cpu_kernels": fused,
        "rounds": rounds,
        "timm": timm_ok,
        "cases": {c.name: {"median_s": statistics.median(c.times), "min_s": min(c.times), "max_s": max(c.times),
                           "group": c.group} for c in cases},
        "memory": memory,
    }


TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "100000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def allocator_setting() -> str:
    """'tuned' when glibc keeps freed large blocks (our setting), 'default' otherwise, as the process started."""
    if all(os.environ.get(k) == v for k, v in TUNED_ENV.items()):
        return "tuned"
    if any(k in os.environ for k in TUNED_ENV) or "LD_PRELOAD" in os.environ:
        return "custom"
    return "default"
