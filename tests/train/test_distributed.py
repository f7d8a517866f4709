"""Two processes (gloo, CPU) through torchrun end with the weights of one process with the same global batch.

SyncBatchNorm refuses CPU tensors, so each process normalises its own half of the batch; the one-process
run that sees exactly that is one accumulating gradients over the same two micro-batches (``--accum-steps
2``). Parameters must agree to float tolerance; BatchNorm running statistics legitimately differ (each rank
keeps its own; rank 0's are saved).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cbam.cli import main

ARGS = [
    "train", "--dataset", "synthetic", "--model", "cifar_resnet20", "--attention", "cbam", "--image-size", "32",
    "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--batch-size", "16", "--lr", "0.05",
    "--epochs", "2", "--no-progress", "--workers", "0", "--seed", "3",
]


@pytest.mark.slow  # subprocess runs: CI's slow phase
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two = tmp_path / "two"
    # ``cbam train --nproc-per-node 2`` runs ``torchrun --nproc-per-node 2 -m cbam train ...`` for the user
    cmd = [sys.executable, "-m", "cbam", *ARGS, "--nproc-per-node", "2", "--output", str(two)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.distributed.run" in done.stdout
    one = tmp_path / "one"
    # torchrun gives each process one intra-op thread (OMP_NUM_THREADS=1); with the same thread count the
    # reductions run in the same order, so the comparison below is not blurred by thread-dependent rounding.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--accum-steps", "2", "--output", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 20
    for key in params:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # only rank 0 wrote: one metrics line per epoch, no duplicate
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 2
