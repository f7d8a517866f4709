"""The code in docs/insertion.md runs as printed (each ```python block, in order, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "insertion.md"


def test_insertion_doc_examples_run() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the project's own documentation
    assert namespace["paths"][0] == "layer1.0.attn" and len(namespace["paths"]) == 16
    missing = namespace["missing"]
    assert missing and all(".attn." in k for k in missing)
    net = torch.nn.Sequential(namespace["MyBlock"](8), namespace["MyBlock"](8))
    assert namespace["cbam"].insert(net, reduction=2) == ["0.attn", "1.attn"]
