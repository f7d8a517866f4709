"""SIGINT / SIGTERM sent to real ``cbam demo``, ``cbam ablate`` and ``cbam train --nproc-per-node 2`` processes.

Each test waits for a file the run writes (a summary, a checkpoint) rather than for a fixed time, so that it
holds on a loaded machine; the timeouts are generous for the same reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TIMEOUT = 300  # seconds for any one process: far above what these tiny runs take on an idle machine

# every run: one optimizer step per epoch, a checkpoint after each, 16 validation images
TINY_YAML = ("model: cifar_resnet20\ndataset: synthetic\nimage_size: 32\nsynthetic_train_size: 32\n"
             "synthetic_val_size: 16\nbatch_size: 16\nmax_steps_per_epoch: 1\nsave_every_steps: 1\nlr: 0.05\n"
             "schedule: cosine\ntensorboard: false\nprogress: false\nworkers: 0\n")


class Run:
    """A ``python -m cbam ...`` process whose stdout and stderr go to files (no pipe to fill up)."""

    def __init__(self, args: list[str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out_file, self.err_file = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.out_file, "w") as out, open(self.err_file, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "cbam", *args], stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.out_file.read_text()

    @property
    def stderr(self) -> str:
        return self.err_file.read_text()

    def wait_for(self, *paths: Path) -> None:
        """Until every path exists; fails (with the output) if the process ends first or it takes too long."""
        deadline = time.monotonic() + TIMEOUT
        while not all(p.exists() for p in paths):
            assert self.proc.poll() is None, f"ended early ({self.proc.returncode}):\n{self.stdout}\n{self.stderr}"
            assert time.monotonic() < deadline, f"no {paths} after {TIMEOUT} s:\n{self.stdout}\n{self.stderr}"
            time.sleep(0.05)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def one_line(stderr: str) -> str:
    """The one line the command printed, apart from the warning of a machine without a C++ compiler (the warning's
    message and the source line Python's warnings module prints under it), which is about the kernels, not this."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "RuntimeWarning: cbam: could not build the CPU kernels" in line:
            del lines[i : i + 2]
            break
    assert len(lines) == 1, stderr
    return lines[0]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes (zombies have none) that contain ``text``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]

# command -> (its flags, the first run's folder, the run interrupted, the folders of the runs after it)
COMMANDS = {
    "demo": (["--epochs", "8", "--seeds", "0", "--pictures", "0"], "plain", "se", ["cbam"]),
    "ablate": (["--budget", "8", "--tables", "3", "--seeds", "0"], "se", "cbam", ["spatial_first", "parallel"]),
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and /proc")
@pytest.mark.parametrize(
    "command, sig",
    [
        pytest.param("demo", signal.SIGTERM, id="demo-SIGTERM"),
        pytest.param("ablate", signal.SIGINT, id="ablate-SIGINT", marks=pytest.mark.slow),
        # the other two pairs, behind the slow marker (CI runs them too)
        pytest.param("demo", signal.SIGINT, id="demo-SIGINT", marks=pytest.mark.slow),
        pytest.param("ablate", signal.SIGTERM, id="ablate-SIGTERM", marks=pytest.mark.slow),
    ],
)
def test_demo_and_ablate_stop_in_one_line_and_continue_when_run_again(tmp_path, command, sig):
    flags, first, second, rest = COMMANDS[command]
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    root = tmp_path / "runs"
    args = [command, "--config", str(tmp_path / "tiny.yaml"), *flags, "--output", str(root)]

    run = Run(args, tmp_path / "first")
    try:
        # the first run finished and the second one has saved a checkpoint: it is mid-training
        run.wait_for(root / first / "summary.json", root / second / "checkpoints" / "last.pt")
        run.proc.send_signal(sig)
        code = run.finish()
    finally:
        run.proc.kill()
    assert code == 128 + sig, run.stderr
    line = one_line(run.stderr)
    assert line.startswith(f"cbam {command}: stopped by {signal.Signals(sig).name}"), line
    assert first in line and "run the same command again" in line and "--resume" not in line
    assert "Traceback" not in run.stderr
    kept = root / first / "model.safetensors"
    assert kept.exists() and (root / first / "summary.json").exists()
    assert not (root / second / "summary.json").exists()
    stamp = kept.stat().st_mtime_ns

    again = Run(args, tmp_path / "again")
    assert again.finish() == 0, again.stderr
    out = again.stdout
    assert f"-> {root / first}: finished earlier, kept (not trained again)" in out
    assert f"-> {root / second}: resuming the interrupted run from {root / second / 'checkpoints' / 'last.pt'}" in out
    assert kept.stat().st_mtime_ns == stamp, "the finished run was trained again"
    for name in (first, second, *rest):
        assert (root / name / "summary.json").exists(), name
    assert (root / "results.md").exists()


ARGS = [
    "train", "--dataset", "synthetic", "--model", "cifar_resnet20", "--attention", "cbam", "--image-size", "32",
    "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--batch-size", "16", "--lr", "0.05",
    "--epochs", "4", "--schedule", "cosine", "--no-progress", "--workers", "0", "--seed", "3",
    "--save-every-steps", "1", "--nproc-per-node", "2",
]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and /proc")
@pytest.mark.slow  # subprocess runs: CI's slow phase
def test_sigterm_to_the_launcher_stops_every_worker_and_resume_is_bit_exact(tmp_path):
    out = tmp_path / "interrupted"
    run = Run([*ARGS, "--output", str(out)], tmp_path / "logs-1")
    try:
        run.wait_for(out / "checkpoints" / "last.pt")  # the workers are training
        assert len(processes_mentioning(str(out))) >= 4, "launcher, torchrun and two workers"
        run.proc.send_signal(signal.SIGTERM)
        code = run.finish()
    finally:
        run.proc.kill()
    left = processes_mentioning(str(out))
    assert code == 128 + signal.SIGTERM, run.stderr
    assert not left, f"still running after the launcher exited: {left}"
    assert "Traceback" not in run.stderr
    assert f"stopped by SIGTERM; saved {out / 'checkpoints' / 'last.pt'}" in run.stderr
    assert run.stderr.count("cbam train: stopped by SIGTERM") == 1, run.stderr  # rank 0 only
    assert "summary.json" not in os.listdir(out), "the run ended before the signal; nothing was tested"

    resumed = Run([*ARGS, "--output", str(out), "--resume"], tmp_path / "logs-2")
    assert resumed.finish() == 0, resumed.stderr
    assert "resuming " in resumed.stdout
    straight = tmp_path / "straight"
    ref = Run([*ARGS, "--output", str(straight)], tmp_path / "logs-3")
    assert ref.finish() == 0, ref.stderr

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(-1).view(torch.uint8), b[key].view(-1).view(torch.uint8)), \
            f"{key} differs after the resume"


# a child that, like torchrun, takes a while to leave after SIGTERM and says when it has left
CHILD = """
import pathlib, signal, sys, time
done = pathlib.Path(sys.argv[1])
def leave(signum, frame):
    time.sleep(1.0)  # saving
    done.write_text(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, leave)
signal.signal(signal.SIGINT, leave)
pathlib.Path(sys.argv[2]).write_text("ready")
while True:
    time.sleep(0.05)
"""
LAUNCHER = ("import sys; from cbam.train.signals import run_forwarding; "
            "sys.exit(run_forwarding([sys.executable, '-c', sys.argv[1], *sys.argv[2:]]))")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
@pytest.mark.parametrize("sig", SIGNALS)
def test_run_forwarding_passes_the_signal_on_and_waits(tmp_path, sig):
    done, ready = tmp_path / "done", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(done), str(ready)])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(timeout=TIMEOUT) == 128 + sig
    finally:
        proc.kill()
    assert done.read_text() == str(int(sig)), "the launcher returned before its child had left"
    assert not processes_mentioning(str(done))
