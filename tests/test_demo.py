"""The seed's demo CLI (``python -m decodekit.demo`` / ``decodekit refine``), end to end on a
tiny saved model that uses the bundled model's tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from decodekit import generate
from decodekit.cli import main as cli_main
from decodekit.demo import main


def _records(path):
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines()]


def test_demo_runs_a_prompts_file_in_batches_and_writes_the_seed_fields(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2+2?\nExplain quantum physics.\nWrite a Python function.\n")
    out = tmp_path / "results.jsonl"
    argv = ["--model_path", str(tiny_model_dir), "--prompts_file", str(prompts), "--add_eos_length", "3",
            "--refine_iter", "2", "--max_new_tokens", "10", "--batch_size", "2",
            "--output_file", str(out), "--max_display", "2", "--use_chat_template", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert printed.out.count("PROMPT:") == 2 and "1 more" in printed.out
    records = _records(out)
    assert [r["prompt"] for r in records] == prompts.read_text().splitlines()
    for r in records:
        assert {"prompt", "response", "full_text", "prompt_length", "response_length",
                "total_length"} <= set(r)
        assert r["total_length"] == r["prompt_length"] + r["response_length"]
        assert 1 <= r["response_length"] <= 10
        assert r["full_text"].startswith("<|im_start|>") and r["prompt"] in r["full_text"]

    # the same tokens as the library call on the same chat-templated prompt
    from decodekit.io import encode_prompts
    from decodekit.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    ids = encode_prompts(tokenizer, [records[0]["prompt"]], use_chat_template=True)
    want = generate(model, ids, strategy="refine", add_eos_length=3, refine_iter=2, max_new_tokens=10)
    assert records[0]["response_token_ids"] == want.sequences[0]


def test_decodekit_refine_subcommand_json_output_converge_and_debug(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["refine", "--model_path", str(tiny_model_dir), "--prompt", "Say hello.", "--add_eos_length", "4",
            "--refine_iter", "converge", "--max_new_tokens", "6", "--output_file", str(out), "--debug"]
    assert cli_main(argv) == 0
    shown = capsys.readouterr().out
    assert "block 0 pass 1" in shown and "passes per block" in shown
    (record,) = _records(out)
    assert record["prompt"] == "Say hello." and record["response_length"] <= 6
    assert record["stats"]["finish_reason"] in ("eos", "length")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--prompt", "a", "--prompts_file", "p.txt"], "exactly one"),
        ([], "exactly one"),
        (["--prompt", "   "], "empty"),
        (["--prompt", "a", "--refine_iter", "0"], "refine_iter"),
        (["--prompt", "a", "--refine_iter", "twice"], "refine_iter"),
        (["--prompt", "a", "--add_eos_length", "0"], "add_eos_length"),
        (["--prompt", "a", "--max_length", "1"], "max_length"),
        (["--prompt", "a", "--batch_size", "0"], "batch_size"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_a_prompt_at_max_length_is_refused_before_generating(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    argv = ["--model_path", str(tiny_model_dir), "--prompt", "one two three four five six seven",
            "--max_length", "5", "--output_file", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_length=5" in err
    assert not out.exists()


def test_python_m_decodekit_demo_bad_input_exit_code():
    proc = subprocess.run([sys.executable, "-m", "decodekit.demo", "--prompt", "x", "--refine_iter", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "refine_iter" in proc.stderr


def test_demo_reruns_keep_results_resume_and_overwrite(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nSay hi.\nName a color.\n")
    out = tmp_path / "inference_results.jsonl"
    argv = ["--model_path", str(tiny_model_dir), "--prompts_file", str(prompts), "--add_eos_length", "2",
            "--max_new_tokens", "3", "--output_file", str(out), "--device", "cpu"]
    assert main(argv) == 0
    full = _records(out)
    assert [r["index"] for r in full] == [0, 1, 2] and all(r["stats"]["dtype"] for r in full)
    before = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2  # the seed's rerun overwrote the results; now it is refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 3 results; pass --resume" in err
    assert out.read_bytes() == before

    out.write_text(json.dumps(full[0]) + "\n")  # an interrupted run: one "Say hi." done
    assert cli_main(["refine"] + argv + ["--resume"]) == 0
    again = _records(out)
    assert [(r["index"], r["response_token_ids"]) for r in again] == [
        (r["index"], r["response_token_ids"]) for r in full]

    assert main(argv + ["--overwrite", "--max_new_tokens", "2"]) == 0
    assert [r["response_length"] <= 2 for r in _records(out)] == [True] * 3
