"""``cbam profile``: counted numbers, every output format, the paper's tables, bad input."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from cbam import create_model
from cbam.cli import main
from cbam.models.complexity import count_macs


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_single_model_json(capsys):
    code, out, _ = run(capsys, "profile", "resnet50", "--attention", "cbam", "--format", "json")
    row = json.loads(out)
    assert code == 0 and row["params"] == 28_089_624 and round(row["gmacs"], 3) == 4.096  # v1.5 layout


def test_stride_in_1x1_reproduces_the_paper_convention(capsys):
    _, out, _ = run(capsys, "profile", "resnet50", "--stride-in-1x1", "--format", "json")
    assert round(json.loads(out)["gmacs"], 3) == 3.858


def test_input_size_and_attention_options_reach_the_model(capsys):
    _, small, _ = run(capsys, "profile", "resnet18", "--attention", "cbam", "--input-size", "112", "--format", "json")
    _, wide, _ = run(capsys, "profile", "resnet18", "--attention", "cbam", "--reduction", "4", "--format", "json")
    assert json.loads(small)["input"] == "112x112" and json.loads(small)["macs"] < 0.3e9 * 2
    assert json.loads(wide)["params"] > 11_779_392


@pytest.mark.parametrize("fmt", ["table", "csv", "markdown", "json"])
def test_paper_table_every_format(capsys, fmt):
    code, out, _ = run(capsys, "profile", "--paper", "--format", fmt)
    assert code == 0
    if fmt == "json":
        rows = json.loads(out)
        assert len(rows) == 30 and all(r["match"] == "yes" for r in rows)
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert len(rows) == 30 and {r["match"] for r in rows} == {"yes"}
    elif fmt == "markdown":
        lines = [line for line in out.splitlines() if line.startswith("|")]
        assert len(lines) == 32 and set(lines[1]) <= set("|-:")
    else:
        assert "30/30 rows match" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["profile", "resnet9000"], "unknown model 'resnet9000'"),
        (["profile"], "expected a model name"),
        (["profile", "resnet18", "--input-size", "0"], "positive integers"),
        (["profile", "resnet18", "--attention", "eca"], "invalid choice"),
        (["profile", "resnet18", "--reduction", "8"], "attention is None"),
        (["profile", "resnet18", "--attention", "cbam", "--kernel-size", "4"], "kernel_size must be a positive odd"),
    ],
)
def test_bad_input(capsys, argv, words):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_counted_macs_do_not_depend_on_where_the_model_runs():
    """The meta device (what ``cbam profile`` uses) and a default-built CPU model (CBAM through its kernels) count
    the same multiply-accumulates: the custom operators report theirs to FlopCounterMode."""
    with torch.device("meta"):
        on_meta = create_model("resnet18", attention="cbam")
    on_cpu = create_model("resnet18", attention="cbam")
    assert count_macs(on_meta) == count_macs(on_cpu) == 1_815_063_764
