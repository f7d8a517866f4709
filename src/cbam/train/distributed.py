"""Several processes and machines through torchrun: set-up, reductions, and the launcher.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; we then use NCCL on GPUs and gloo on the CPU. Only rank 0
writes files and shows progress. Note that ``SyncBatchNorm`` refuses CPU tensors, so on the CPU every
process normalises its own micro-batch (like one process that accumulates gradients over the same
micro-batches).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .signals import run_forwarding


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; choose the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (identity on one process)."""
    if info.distributed:
        values = values.to(info.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


# seconds torchrun gives its workers, once it has passed a signal on, to save and leave before it kills them
# (torchrun's own default is 30, short for a worker that is evaluating when the signal comes); the environment
# variable torchrun reads (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) sets it instead when given
SHUTDOWN_TIMEOUT_S = 300


def launch_torchrun(nproc_per_node: int, argv: list[str]) -> int:
    """Run ``torchrun --nproc-per-node N -m cbam train ...`` for the user and wait for it and its workers.

    SIGINT / SIGTERM are passed on to torchrun, which passes them to every worker; the workers save their
    checkpoint and leave, and this returns 128 + the signal's number once all of them have exited (nothing is
    left running). Otherwise it returns torchrun's exit code.
    """
    args = ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
    args += ["-m", "cbam", *argv]
    print("launching: -m torch.distributed.run", " ".join(args), flush=True)
    # torchrun itself, through torchrun_main: a signal ends it with an exit code rather than a traceback
    runner = "import sys; from cbam.train.distributed import torchrun_main; sys.exit(torchrun_main())"
    return run_forwarding([sys.executable, "-c", runner, *args])


def torchrun_main() -> int:
    """torchrun (``python -m torch.distributed.run``) on ``sys.argv[1:]``; stopped by a signal (once its workers
    have exited), it returns 128 + the signal's number instead of ending in a traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main()
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
