"""The README's Python examples run as written, in order, on the bundled model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert "dk.load_model()" in blocks[0]  # the first block defines model, tok, rows


@pytest.mark.slow
def test_readme_python_examples_run_as_written(capsys):
    namespace: dict = {"__name__": "readme"}
    for n, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {n}", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"README python block {n} failed: {exc!r}\n{block}") from exc
    printed = capsys.readouterr().out
    assert "Paris" in printed  # the first example's greedy answer is printed
