"""The same command gives the same output on two runs, with the default dtype and the default
(timing-driven) draft policy: the second process reads the forward-cost curve the first one
measured (``decodekit.costs``), so both verify the same draft widths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import pytest

pytestmark = pytest.mark.slow


def _run(tmp_path, n: int, prompts: str, costs: str) -> tuple[list[list[int]], str]:
    out = tmp_path / f"run{n}.jsonl"
    env = {**os.environ, "DECODEKIT_COST_CACHE": costs}
    proc = subprocess.run(
        [sys.executable, "-m", "decodekit", "generate", "--strategy", "prompt_lookup", "--prompts_file", prompts,
         "--batch_size", "2", "--max_new_tokens", "32", "--output_file", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    return [r["response_token_ids"] for r in records], proc.stderr


def test_two_runs_of_prompt_lookup_with_the_default_dtype_give_the_same_tokens(tmp_path):
    lines = resources.files("decodekit").joinpath("data/grounded.jsonl").read_text().splitlines()[:4]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": json.loads(x)["prompt"]}) for x in lines) + "\n")
    costs = tmp_path / "cost_curves"
    first, stderr = _run(tmp_path, 1, str(prompts), str(costs))
    assert "dtype float32 (the CPU default" in stderr  # the default and why, in one line
    assert list(costs.glob("*.json"))  # the first run kept its calibration
    second, _ = _run(tmp_path, 2, str(prompts), str(costs))
    assert len(first) == 4 and all(first)
    assert first == second
