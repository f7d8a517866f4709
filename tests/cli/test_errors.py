"""Library code raises ValueError / TypeError; only the command line turns them into one line and exit code 2."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cbam
from cbam.cli import COMMANDS, Command, main
from cbam.profile import profile_row
from cbam.train.compare import ablate
from cbam.train.config import TrainConfig, resolve
from cbam.train.engine import check_output, evaluate_run

SRC = Path(cbam.__file__).parent


def _is_plain_value_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and not type(exc).__module__.startswith("cbam.cli")


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda tmp: resolve({"epochs": 0}), "epochs must be at least 1"),
        (lambda tmp: resolve({"config": "imagenet1k"}), "neither a recipe"),
        (lambda tmp: check_output(TrainConfig(output=str(tmp / "none"), resume=True)), "no checkpoint to resume"),
        (lambda tmp: ablate(TrainConfig(), tmp, budget=0, seeds=[0], tables=["1"]), "at least 1"),
        (lambda tmp: ablate(TrainConfig(), tmp, budget=1, seeds=[0], tables=["9"]), "subset of 1, 2, 3"),
        (lambda tmp: profile_row("resnet9000"), "unknown model 'resnet9000'"),
        (lambda tmp: evaluate_run(tmp / "missing"), "does not exist"),
    ],
)
def test_library_functions_raise_value_error(tmp_path, call, words):
    with pytest.raises(ValueError, match=words) as info:
        call(tmp_path)
    assert _is_plain_value_error(info.value)
    assert "\n" not in str(info.value)


def test_only_the_cli_package_parses_arguments():
    """argparse and cbam.cli are imported by cbam/cli/ alone; no command-line error type is left."""
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                if name == "argparse" or name.startswith("cbam.cli") or name.lstrip(".") == "cli":
                    offenders.append(f"{rel}: import {name}")
        assert "UsageError" not in path.read_text(), rel
    assert not offenders, offenders
    assert not (SRC / "errors.py").exists()


@pytest.mark.parametrize("exc", [ValueError("bad value\n  on two lines"), TypeError("bad type")])
def test_a_command_raising_becomes_one_line_and_exit_code_2(monkeypatch, capsys, exc):
    def run(args):
        raise exc

    monkeypatch.setitem(COMMANDS, "profile", Command(COMMANDS["profile"].add_arguments, run, "test"))
    assert main(["profile", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cbam profile: error: ")
    assert " ".join(str(exc).split()) in " ".join(err.split())


def test_argparse_errors_are_one_line_and_exit_code_2(capsys):
    for argv in (["ablate", "--budget", "1", "--tables", "9"], ["train", "--nproc-per-node", "0"],
                 ["bench", "--rounds", "3"], ["nonsense"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error:" in err, (argv, err)


def test_from_the_shell_a_bad_value_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "CBAM_MALLOC": "default"}
    done = subprocess.run([sys.executable, "-m", "cbam", "train", "--epochs", "0", "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "cbam train: error: epochs must be at least 1, got 0"
    assert not (tmp_path / "run").exists()
