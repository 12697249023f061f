"""The prompt suites shipped in ``decodekit/data``: what the bench measures on, and what
draft-head training must leave out (``decodekit.strategies.eagle.training_prompts``). Both read them
from here, so training does not import the bench."""

from __future__ import annotations

import json
from importlib import resources

from decodekit.validation import check_choice

__all__ = ["SUITES", "load_suite"]

SUITES = {"chat": "chat.jsonl", "grounded": "grounded.jsonl", "qa": "qa.jsonl"}


def load_suite(name: str) -> list[dict]:
    """The suite's records (``{"prompt": ..., "answer": [...]?}``) from decodekit/data."""
    check_choice("suite", name, SUITES)
    text = resources.files("decodekit").joinpath("data", SUITES[name]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
