"""The Keras example of docs/keras.md (the README's) runs as written: a small ResNet with CBAM, one epoch of
``model.fit``, the loss going down."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "keras.md"
HEADING = "## Example: a small ResNet with CBAM, trained with `model.fit`"

pytestmark = pytest.mark.usefixtures("single_thread")  # two shared cores: one thread is several times faster


def example_block() -> str:
    text = DOC.read_text()
    assert HEADING in text
    return re.search(r"```python\n(.*?)```", text.split(HEADING, 1)[1], flags=re.S).group(1)


def test_example_trains():
    block = example_block()
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) <= 26 and "cbam.keras.cbam_block" in block and "model.fit(" in block
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["after"] < namespace["before"]
    assert sum(type(layer).__name__ == "CBAM" for layer in namespace["model"].layers) == 3
