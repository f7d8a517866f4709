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

from ..fused import fuse as fuse_model
from ..fused import native
from ..layers import CBAM, SE, reference_only
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
def _under_reference(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn with every CBAM module computing its reference path while it runs (and compiles)."""

    def run():
        with reference_only():
            return fn()

    return run


def _module_variants(channels: int, timm_ok: bool) -> dict[str, Callable[[], nn.Module]]:
    variants: dict[str, Callable[[], nn.Module]] = {
        "cbam-reference": lambda: CBAM(channels),  # timed under reference_only()
        "cbam-fused": lambda: CBAM(channels),  # as dispatched: the CPU kernels where they serve
        "se": lambda: SE(channels),
    }
    if timm_ok:
        from timm.layers.cbam import CbamModule

        variants["timm-cbam"] = lambda: CbamModule(channels)
    return variants


def module_cases(shapes, dtypes, device, compile_modules: bool, timm_ok: bool) -> list[Case]:
    cases: list[Case] = []
    for shape in shapes:
        for dtype in dtypes:
            tag = f"{'x'.join(map(str, shape))}/{str(dtype).replace('torch.', '')}"
            x = torch.randn(shape, device=device, dtype=dtype)
            y = torch.empty_like(x)
            grad = torch.randn_like(x)
            cases.append(Case(f"module/{tag}/copy", lambda x=x, y=y: y.copy_(x), f"module/{tag}"))
            for name, make in _module_variants(shape[1], timm_ok).items():
                module = make().to(device=device, dtype=dtype)
                wrap = _under_reference if name == "cbam-reference" else (lambda fn: fn)
                runs = [(name, module)]
                if compile_modules and name != "cbam-reference":
                    runs.append((f"{name}-compiled", torch.compile(copy.deepcopy(module))))
                for label, m in runs:
                    xg = x.clone().requires_grad_(True)

                    def fwd(m=m, x=x):
                        with torch.no_grad():
                            return m(x)

                    def fwd_bwd(m=m, xg=xg, grad=grad):
                        m(xg).backward(grad)
                        xg.grad = None

                    cases.append(Case(f"module/{tag}/fwd/{label}", wrap(fwd), f"module/{tag}"))
                    cases.append(Case(f"module/{tag}/fwd+bwd/{label}", wrap(fwd_bwd), f"module/{tag}"))
    return cases


# variant -> (attention, how it runs): "as built" (CBAM modules dispatched per call: the CPU kernels), "reference"
# (reference_only()), "fused" (cbam.fuse: folded BatchNorms and residual tail) or "fused-memory-efficient"
NETWORK_VARIANTS = {
    "plain": (None, "as built"),
    "se": ("se", "as built"),
    "cbam-reference": ("cbam", "reference"),
    "cbam-fused": ("cbam", "fused"),
    # the last BatchNorm, addition and ReLU left to the block: what cbam.fuse buys on top of the module's kernels
    "cbam-fused-no-tail": ("cbam", "as built"),
    "cbam-fused-memory-efficient": ("cbam", "fused-memory-efficient"),
}


def _network(variant: str, model: str, device, fuse: bool, log: Callable[[str], None]) -> nn.Module:
    torch.manual_seed(0)
    attention, how = NETWORK_VARIANTS[variant]
    net = create_model(model, num_classes=1000, attention=attention).to(device)
    if how.startswith("fused") and (fuse or how == "fused-memory-efficient"):
        changed = fuse_model(net, memory_efficient=how == "fused-memory-efficient")
        log(f"cbam.fuse({variant}): {len(changed)} blocks fused")
    return net


def network_cases(
    model: str, batch: int, size: int, device, compile_networks: bool, fuse: bool = True, log: Callable = print
) -> tuple[list[Case], dict]:
    cases: list[Case] = []
    memory: dict[str, dict[str, int]] = {}
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    for variant, (_, how) in NETWORK_VARIANTS.items():
        if not fuse and variant == "cbam-fused-no-tail":
            continue  # without fusion it is the cbam-fused network
        net = _network(variant, model, device, fuse, log)
        wrap = _under_reference if how == "reference" else (lambda fn: fn)
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

            cases.append(Case(f"network/{model}/inference/{label}", wrap(infer), f"network/{model}/inference"))
            cases.append(Case(f"network/{model}/train-step/{label}", wrap(train_step), f"network/{model}/train-step"))
        net.train()

        def one_step(net=net):
            F.cross_entropy(net(x), target).backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        memory[variant] = {"saved_bytes": saved_bytes(wrap(one_step))}
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
    fuse: bool = True,
    allocator: str = "unknown",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every case in ``rounds`` interleaved rounds after one warm-up round; return all figures.

    ``fuse``: apply ``cbam.fuse`` to the CBAM networks where it serves. ``allocator`` is the glibc setting this
    process was started with, as the caller knows it (reported, never changed here).
    """
    dev = torch.device(device)
    dtype_map = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        import timm  # noqa: F401

        timm_ok = True
    except ImportError:
        timm_ok = False
    cases: list[Case] = []
    memory: dict[str, Any] = {}
    if dev.type == "cpu":
        native.load()  # build before anything is timed
        fused = native.native_status()
    else:
        fused = f"no kernel registered for {dev.type}: CBAM computes its reference path"
    if modules:
        shapes = shapes or MODULE_SHAPES["quick" if quick else "full"]
        cases += module_cases(shapes, [dtype_map[d] for d in dtypes], dev, compile_modules, timm_ok)
    if networks:
        fuse = fuse and dev.type == "cpu"  # on other devices only the memory-efficient variant is fused
        net_cases, memory = network_cases(
            network_model, network_batch, network_size, dev, compile_networks, fuse=fuse, log=log
        )
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
        "allocator": allocator,
        "fused_cpu_kernels": fused,
        "rounds": rounds,
        "timm": timm_ok,
        "cases": {c.name: {"median_s": statistics.median(c.times), "min_s": min(c.times), "max_s": max(c.times),
                           "group": c.group} for c in cases},
        "memory": memory,
    }
