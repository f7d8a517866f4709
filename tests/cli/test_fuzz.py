"""Fuzzing the command line: random command lines and YAML files for train, eval, demo, ablate, profile and bench.

Every case either runs (tiny synthetic settings, in this process through ``cbam.cli.main``) or exits 2 with exactly
one line on stderr and no traceback, and a refused command leaves no folder behind. Values are drawn from pools
of valid ones (kept small, so a run takes about a second) and invalid ones (wrong types, out-of-range numbers,
unknown keys and choices, odd paths). The default suite tries the cases of ``EXAMPLES`` (about a minute);
``-m slow`` ten times as many. Each test prints how many cases it tried and how they ended (``-s``;
``CBAM_FUZZ_VERBOSE=1`` also lists the error lines).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbam.cli import main

# cases per command in the default suite (about a minute in all); -m slow tries ten times as many
EXAMPLES = {"train": 30, "eval": 8, "demo": 6, "ablate": 3, "profile": 16, "bench": 5}
SLOW_FACTOR = 10

BAD_NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e309", "abc", "", "99999999999999999999", "1.5", "0x10"]
PATHS = ["{d}/out", "{d}/afile/sub", "{d}/afile", "{d}/a b/ü nicode", "{d}/deep/er/out", "", "{d}/dir"]

# flag -> values (valid ones small enough for a run of about a second, then invalid ones)
TRAIN_FLAGS: dict[str, list[str]] = {
    "--model": ["cifar_resnet20", "resnet9000", "", "RESNET18"],
    "--attention": ["none", "cbam", "se", "bam", "eca", "CBAM"],
    "--reduction": ["4", "8", *BAD_NUMBERS],
    "--kernel-size": ["3", "7", "4", *BAD_NUMBERS],
    "--arrangement": ["channel_first", "spatial_first", "parallel", "diagonal"],
    "--preset": ["paper", "seed", "timm", "ultralytics", "foo"],
    "--pool-types": ["avg", "max", "avg,max", "lse", ","],
    "--spatial-compress": ["pool", "conv", "none"],
    "--widen": ["2.0", *BAD_NUMBERS],
    "--dataset": ["synthetic", "cifar10", "imagenet22k"],
    "--data-dir": ["{d}/data", "{d}/afile", "{d}/dir"],
    "--image-size": ["32", "40", "8", *BAD_NUMBERS],
    "--bad-images": ["stop", "skip", "ignore"],
    "--synthetic-train-size": ["16", "32", *BAD_NUMBERS],
    "--synthetic-val-size": ["8", "16", *BAD_NUMBERS],
    "--synthetic-classes": ["2", "10", "1", "1000", *BAD_NUMBERS],
    "--synthetic-seed": ["0", "7", *BAD_NUMBERS],
    "--workers": ["0", *BAD_NUMBERS],
    "--epochs": ["1", *BAD_NUMBERS],
    "--batch-size": ["8", "16", "100000", *BAD_NUMBERS],
    "--lr": ["0.05", "1", *BAD_NUMBERS],
    "--lr-reference-batch": ["256", *BAD_NUMBERS],
    "--momentum": ["0.9", "0", "1", "2", *BAD_NUMBERS],
    "--weight-decay": ["0", "1e-4", *BAD_NUMBERS],
    "--schedule": ["step", "cosine", "constant", "linear"],
    "--step-size": ["1", "30", *BAD_NUMBERS],
    "--gamma": ["0.1", *BAD_NUMBERS],
    "--warmup-epochs": ["0", "1", *BAD_NUMBERS],
    "--label-smoothing": ["0", "0.1", "1", "2", *BAD_NUMBERS],
    "--accum-steps": ["1", "2", "3", *BAD_NUMBERS],
    "--amp": ["bf16", "fp32"],
    "--device": ["auto", "cpu", "cuda", "cuda:7", "foo", "", "mps"],
    "--seed": ["0", "3", "-5", *BAD_NUMBERS],
    "--save-every-steps": ["0", "1", *BAD_NUMBERS],
    "--max-steps-per-epoch": ["1", *BAD_NUMBERS],
    "--output": PATHS,
    "--config": ["{d}/fuzz.yaml", "{d}/fuzz.yaml", "{d}/fuzz.yaml", "demo", "imagenet1k", "{d}/afile", "{d}/none.yaml"],
}
TRAIN_SWITCHES = ["--resume", "--overwrite", "--nesterov", "--no-fuse", "--memory-efficient", "--channels-last",
                  "--no-spatial", "--stride-in-1x1", "--bogus-flag"]
# always given first (a drawn flag given later wins): what keeps a valid run to about a second
TRAIN_GUARD = ["--model", "cifar_resnet20", "--image-size", "32", "--synthetic-train-size", "16",
               "--synthetic-val-size", "8", "--batch-size", "8", "--epochs", "1", "--max-steps-per-epoch", "1",
               "--workers", "0", "--no-progress", "--no-tensorboard", "--no-compile", "--no-download",
               "--output", "{d}/out"]

# YAML keys: TrainConfig keys with values of every type, and keys that do not exist
YAML_VALUES = st.one_of(
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans(), st.none(),
    st.sampled_from(["cbam", "eca", "foo", "", "step", "bf16", "pool", "paper", "synthetic", "cpu", "cuda"]),
    st.lists(st.sampled_from(["avg", "max", "lse"]), max_size=3), st.dictionaries(st.just("a"), st.integers()),
)
YAML_KEYS = ["attention", "reduction", "kernel_size", "arrangement", "preset", "pool_types", "spatial_compress",
             "spatial", "lr", "momentum", "weight_decay", "nesterov", "schedule", "step_size", "gamma",
             "warmup_epochs", "label_smoothing", "accum_steps", "amp", "seed", "bad_images", "fuse", "device",
             "channels_last", "synthetic_classes", "synthetic_seed", "save_every_steps", "memory_efficient",
             "epoch", "learning_rate", "attn", "model_name"]
# demo / ablate read sizes from their recipe: the tiny one below, under the drawn keys
TINY_YAML = {"model": "cifar_resnet20", "dataset": "synthetic", "image_size": 32, "synthetic_train_size": 16,
             "synthetic_val_size": 8, "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "tensorboard": False,
             "compile": False, "download": False, "workers": 0}
# keys a drawn YAML may not set for demo / ablate (their flags cannot bring them back to tiny values)
SIZE_KEYS = {"synthetic_train_size", "synthetic_val_size", "epochs", "max_steps_per_epoch", "image_size"}

COMPARE_FLAGS: dict[str, list[str]] = {
    "--model": ["cifar_resnet20", "resnet9000"],
    "--dataset": ["synthetic", "cifar10", "imagenet22k"],
    "--data-dir": ["{d}/data", "{d}/afile"],
    "--batch-size": ["8", *BAD_NUMBERS],
    "--lr": ["0.05", *BAD_NUMBERS],
    "--workers": ["0", *BAD_NUMBERS],
    "--device": ["cpu", "auto", "cuda:3", "foo"],
    "--output": PATHS,
    "--format": ["table", "json", "markdown", "csv", "html"],
}
DEMO_FLAGS = {**COMPARE_FLAGS, "--epochs": ["1", *BAD_NUMBERS], "--seeds": ["0", "1", "-1", "a", ""]}
ABLATE_FLAGS = {**COMPARE_FLAGS, "--budget": ["1", *BAD_NUMBERS], "--seeds": ["0", "0,1", "-1", "a", ""],
                "--tables": ["3", "9", "", "3,9"]}
PROFILE_FLAGS: dict[str, list[str]] = {
    "--attention": ["none", "cbam", "se", "bam", "eca"],
    "--reduction": ["4", "16", *BAD_NUMBERS],
    "--kernel-size": ["3", "7", "4", *BAD_NUMBERS],
    "--arrangement": ["parallel", "diagonal"],
    "--preset": ["timm", "ultralytics", "foo"],
    "--pool-types": ["avg", "lse"],
    "--spatial-compress": ["conv", "none"],
    "--widen": ["1.5", *BAD_NUMBERS],
    "--width-mult": ["0.7", *BAD_NUMBERS],
    "--in-chans": ["1", *BAD_NUMBERS],
    "--input-size": ["32", "64x48", "0", "x", "1x2x3"],
    "--format": ["table", "json", "csv", "markdown", "yaml"],
}
PROFILE_MODELS = ["resnet50", "cifar_resnet20", "mobilenet_v1", "wide_resnet18", "resnet9000", ""]
EVAL_FLAGS: dict[str, list[str]] = {
    "--checkpoint": ["{run}", "{run}/checkpoints/last.pt", "{run}/model.safetensors", "{d}/missing",
                     "{d}/garbage.pt", "{d}/afile", "{d}/dir"],
    "--dataset": ["synthetic", "cifar10", "imagenet22k"],
    "--data-dir": ["{d}/data", "{d}/afile"],
    "--batch-size": ["8", *BAD_NUMBERS],
    "--workers": ["0", *BAD_NUMBERS],
    "--output": ["{d}/eval.json", "{d}/afile/x.json", "{d}/dir", "{d}/new/eval.json", ""],
}
BENCH_FLAGS: dict[str, list[str]] = {
    "--device": ["cpu", "cuda", "auto", "foo"],
    "--rounds": ["5", "3", *BAD_NUMBERS],
    "--min-seconds": ["0.001", *BAD_NUMBERS],
    "--dtypes": ["fp32", "fp32,bf16", "int8", ""],
    "--shapes": ["1x16x4x4", "2x32x3x3", "1x8x4x4", "1x16x4", "x"],
    "--network": ["resnet9000", "cifar_resnet20"],
    "--output": ["{d}/b/bench.json", "{d}/afile/x.json", "{d}/dir", ""],
    "--markdown": ["{d}/b/bench.md", "{d}/afile/x.md"],
}
BENCH_GUARD = ["--allocator", "current", "--no-networks", "--no-compile", "--shapes", "1x16x4x4", "--rounds", "5",
               "--min-seconds", "0.001", "--output", "{d}/b/bench.json"]


def _flags(pools: dict[str, list[str]], most: int) -> st.SearchStrategy[list[str]]:
    pair = st.sampled_from(sorted(pools)).flatmap(lambda f: st.sampled_from(pools[f]).map(lambda v: [f, v]))
    return st.lists(pair, max_size=most).map(lambda pairs: [x for p in pairs for x in p])


@st.composite
def cases(draw, command: str) -> tuple[str, list[str], dict | None]:
    """(command, argv with {d} / {run} placeholders, YAML written to {d}/fuzz.yaml or None)."""
    fuzz_yaml = draw(st.none() | st.dictionaries(st.sampled_from(YAML_KEYS), YAML_VALUES, max_size=4))
    if command == "train":
        argv = [*TRAIN_GUARD, *draw(_flags(TRAIN_FLAGS, 5))]
        argv += draw(st.lists(st.sampled_from(TRAIN_SWITCHES), max_size=2, unique=True))
        return command, argv, fuzz_yaml
    if command in ("demo", "ablate"):
        tiny = {**TINY_YAML, **{k: v for k, v in (fuzz_yaml or {}).items() if k not in SIZE_KEYS}}
        flags = DEMO_FLAGS if command == "demo" else ABLATE_FLAGS
        guard = ["--config", "{d}/fuzz.yaml", "--no-progress", "--output", "{d}/out"]
        guard += ["--budget", "1", "--tables", "3"] if command == "ablate" else ["--seeds", "0", "--pictures", "0"]
        return command, [*guard, *draw(_flags(flags, 4))], tiny
    if command == "profile":
        model = draw(st.sampled_from(PROFILE_MODELS + ["--list"]))
        return command, [model, *draw(_flags(PROFILE_FLAGS, 4))], None
    if command == "eval":
        return command, ["--checkpoint", "{run}", *draw(_flags(EVAL_FLAGS, 4))], None
    return command, [*BENCH_GUARD, *draw(_flags(BENCH_FLAGS, 3))], None


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def report(self) -> str:
        return f"{sum(self.counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A tiny finished run for ``cbam eval`` to read."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    argv = [arg.replace("{d}/out", str(out)) for arg in TRAIN_GUARD]
    assert main(["train", *argv]) == 0
    return out


def check_case(case: tuple[str, list[str], dict | None], run: Path, tally: Tally) -> None:
    command, argv, fuzz_yaml = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "afile").write_text("a file, not a folder")
        (d / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
        (d / "dir").mkdir()
        if fuzz_yaml is not None:
            (d / "fuzz.yaml").write_text(yaml.safe_dump(fuzz_yaml))
        args = [a.replace("{d}", str(d)).replace("{run}", str(run)) for a in argv]
        before = _tree(d)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([command, *args])
        err_text = err.getvalue()
        assert "Traceback" not in err_text, (command, args, err_text)
        if code == 0:
            tally.add(f"{command} ran")
            if command == "train":
                output = Path(args[len(args) - 1 - args[::-1].index("--output") + 1])
                for name in ("config.yaml", "summary.json", "model.safetensors", "checkpoints/last.pt"):
                    assert (output / name).is_file(), (args, name)
            return
        assert code == 2, (command, args, code, err_text)
        lines = err_text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cbam"), (command, args, err_text)
        assert "error" in lines[0], (command, args, err_text)
        # nothing new was made by a refused command (a folder for a run, a half-written file)
        assert _tree(d) == before, (command, args, sorted(_tree(d) - before))
        tally.add(f"{command} refused")
        tally.errors[lines[0]] = tally.errors.get(lines[0], 0) + 1


def _fuzz(saved_run: Path, command: str, examples: int) -> Tally:
    tally = Tally()
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp())
    os.chdir(work)  # a default output (runs/...) lands here, never in the repository
    try:
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(cases(command))
        def property_(case):
            check_case(case, saved_run, tally)

        property_()
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nfuzz {command}: {tally.report()}")
    if os.environ.get("CBAM_FUZZ_VERBOSE"):
        print("\n".join(f"  {n} x {line}" for line, n in sorted(tally.errors.items())))
    return tally


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_fuzz_command_lines_and_yaml(saved_run, command):
    tally = _fuzz(saved_run, command, EXAMPLES[command])
    assert sum(tally.counts.values()) >= EXAMPLES[command]


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_fuzz_command_lines_and_yaml_many(saved_run, command):
    tally = _fuzz(saved_run, command, EXAMPLES[command] * SLOW_FACTOR)
    assert sum(tally.counts.values()) >= EXAMPLES[command] * SLOW_FACTOR
