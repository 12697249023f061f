"""``decodekit bench``: argument checks, suites, the floor loop, report/JSON writers and a
tiny end-to-end run on a tiny model saved to disk (fast, no real model)."""

from __future__ import annotations

import json
import string

import pytest
import torch

import decodekit
from decodekit import bench, costs
from decodekit.bench import cli as bench_cli
from decodekit.bench import runners
from decodekit.bench.report import render_report, summarize, write_outputs
from decodekit.cli import main

from conftest import EOS, PAD, tiny_llama


def _args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "greedy,warp_drive"], "strategies"),
        (["--suite", "poetry"], "suite"),
        (["--batch_sizes", "1,0"], "batch_sizes"),
        (["--batch_sizes", "one"], "batch_sizes"),
        (["--trials", "0"], "trials"),
        (["--max_new_tokens", "0"], "max_new_tokens"),
        (["--dtypes", "float8"], "dtypes"),
        (["--preset", "turbo"], "preset"),
        (["--device", "tpu"], "device"),
        (["--clock", "sundial"], "clock"),
        (["--gammas", "0"], "gammas"),
        (["--num_prompts", "0"], "num_prompts"),
    ],
)
def test_bad_arguments_are_refused(argv, message, tmp_path):
    with pytest.raises(decodekit.DecodeKitError, match=message):
        bench.resolve_config(_args(argv + ["--output_dir", str(tmp_path)]))


def test_cli_refuses_bad_input_before_loading_a_model(tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(bench_cli, "load_models", no_model)
    a_file = tmp_path / "report.txt"
    a_file.write_text("x")
    assert main(["bench", "--output_dir", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    for argv in (["--trials", "0"], ["--batch_sizes", "0"], ["--suite", "nope"], ["--strategies", "nope"]):
        assert main(["bench", *argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_presets_fill_in_and_flags_win(tmp_path):
    quick = bench.resolve_config(_args(["--quick", "--output_dir", str(tmp_path)]))
    assert (quick.trials, quick.batch_sizes, quick.gammas, quick.num_prompts) == (1, [1], [], 1)
    quick5 = bench.resolve_config(_args(["--quick", "--trials", "5", "--output_dir", str(tmp_path)]))
    assert quick5.trials == 5
    found = bench.resolve_config(_args(["--preset", "foundation", "--output_dir", str(tmp_path)]))
    assert found.strategies == ["greedy"] and found.batch_sizes == [1, 8]
    assert found.dtypes == ["float32", "bfloat16"] and found.ignore_eos
    default = bench.resolve_config(_args(["--output_dir", str(tmp_path)]))
    assert default.suites == ["chat", "grounded", "qa"] and default.trials == 3


def test_only_registered_strategies_are_benchmarked(tmp_path, monkeypatch):
    from decodekit import strategies

    registered = {k: v for k, v in strategies.STRATEGIES.items() if k != "beam"}
    monkeypatch.setattr(strategies, "STRATEGIES", registered)
    cfg = bench.resolve_config(_args(["--output_dir", str(tmp_path)]))
    assert "beam" not in cfg.strategies and "greedy" in cfg.strategies
    with pytest.raises(decodekit.DecodeKitError, match="not available"):
        bench.resolve_config(_args(["--strategies", "beam", "--output_dir", str(tmp_path)]))


def test_plan_interleaves_transformers_and_the_floor(tmp_path):
    cfg = bench.resolve_config(_args(["--strategies", "greedy,speculative", "--batch_sizes", "1,4",
                                      "--gammas", "2,5", "--output_dir", str(tmp_path)]))
    keys = [r.key for r in runners.plan_runs(cfg)]
    assert "floor/floor float32 b1" in keys and "floor/floor float32 b4" in keys
    assert "greedy/transformers float32 b4" in keys
    assert "speculative/transformers float32 b1" in keys
    assert "speculative/transformers float32 b4" not in keys  # transformers: batch 1 only
    assert "speculative/decodekit gamma=2 float32 b1" in keys
    assert not any("gamma=5" in k for k in keys)  # the default gamma is the main run


# ---------------------------------------------------------------------------- suites
@pytest.mark.parametrize("suite", list(bench.SUITES))
def test_suites_have_at_least_12_prompts(suite):
    records = bench.load_suite(suite)
    assert len(records) >= 12
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in records)
    if suite == "qa":
        assert all(r["answer"] and all(isinstance(a, str) for a in r["answer"]) for r in records)


def test_batches_fill_up_across_suites(tmp_path):
    class CharTokenizer:
        chat_template = None

        def __call__(self, text, add_special_tokens=True, split_special_tokens=False):
            return {"input_ids": [5 + len(text) % 7] * (1 + len(text) % 5)}

    cfg = bench.resolve_config(_args(["--num_prompts", "2", "--output_dir", str(tmp_path)]))
    batches = runners.make_batches(CharTokenizer(), cfg, 4, PAD)
    assert [b.ids.shape[0] for b in batches] == [4, 2]
    assert batches[0].suites == ["chat", "chat", "grounded", "grounded"] and batches[0].suite == "mixed"
    assert batches[1].suite == "qa" and batches[1].records[0]["answer"]
    assert bool((batches[0].mask[:, -1] == 1).all())  # left padded


# ---------------------------------------------------------------------------- the floor
def test_floor_loop_reproduces_greedy_with_left_padding(llama):
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    ids, mask = decodekit.left_pad(rows, PAD)
    floor = bench.floor_generate(llama, ids, mask, 6)
    ours = decodekit.generate(llama, ids, mask, max_new_tokens=6, eos_token_id=[], pad_token_id=PAD)
    assert floor == ours.sequences


def test_forward_counter_counts_target_calls_only(llama):
    from decodekit.strategies.speculative import early_exit_model

    ids = torch.tensor([[5, 6, 7]])
    with runners.ForwardCounter(llama) as counter:
        llama(input_ids=ids)
        early_exit_model(llama, 1)(input_ids=ids)  # a drafter sharing the target's weights
        llama(input_ids=ids)
    assert counter.calls == 2


# ---------------------------------------------------------------------------- report writers
def _trial(tokens, seconds, suite="chat"):
    return {"tokens": tokens, "seconds": seconds, "suites": {suite: {"tokens": tokens, "seconds": seconds}}}


def _run(strategy, impl, rates, gamma=None, spec=None, quality=None, identical=None, error=None):
    return {"strategy": strategy, "impl": impl, "dtype": "float32", "batch_size": 1, "gamma": gamma,
            "key": f"{strategy}/{impl}", "options": {"gamma": 5} if strategy == "speculative" else {},
            "trials": [_trial(r * 2, 2.0) for r in rates], "spec": spec or {}, "peak_rss_mib": 900.0,
            "quality": quality or {}, "identical_to_greedy": identical, "error": error}


def _results():
    card = {"cpu": "Test CPU", "cpu_cores": 2, "torch_threads": 2, "gpu": None, "device": "cpu",
            "python": "3", "torch": "2", "transformers": "5", "decodekit": "0", "model": "tiny",
            "model_class": "Llama", "parameters": 1000, "bandwidth_gb_s": 10.0,
            "weights": {"float32": {"bytes": 4000, "floor_ms_per_token": 0.4}}}
    spec = {"forwards": 10, "tokens_per_row": 20.0, "drafted": 30, "accepted": 15, "verify_steps": 10,
            "histogram": {"0": 4, "3": 6}}
    runs = [
        _run("floor", "floor", [50, 40, 60]),
        _run("greedy", "decodekit", [20, 30, 25], spec={"forwards": 20, "tokens_per_row": 20.0},
             quality={"loglik_per_token": -0.5, "distinct_2": 0.9, "exact_match": 0.75}),
        _run("greedy", "transformers", [10, 12.5, 11], identical="3/3"),
        _run("speculative", "decodekit", [50], spec=spec, identical="3/3"),
        _run("speculative", "decodekit", [40], gamma=2, spec=spec),
        _run("beam", "decodekit", [], error="RuntimeError: boom"),
    ]
    return {"card": card, "config": {"max_new_tokens": 8, "trials": 3, "ignore_eos": False},
            "completed": True, "wall_seconds": 3.0, "prompts": {"chat": 3, "qa": 2}, "runs": runs,
            "command": "decodekit bench --quick"}


def test_summary_ratios():
    rows = {(r["strategy"], r["impl"], r["gamma"] if r["swept"] else None): r for r in summarize(_results())}
    greedy = rows[("greedy", "decodekit", None)]
    assert greedy["tokens_per_s"] == 25 and (greedy["tokens_per_s_min"], greedy["tokens_per_s_max"]) == (20, 30)
    assert greedy["x_greedy"] == 1.0 and greedy["x_transformers"] == pytest.approx(25 / 11)
    assert greedy["x_floor_ms"] == pytest.approx(50 / 25)  # twice the floor's ms per token
    assert greedy["ms_per_token"] == pytest.approx(40.0) and greedy["forwards_per_token"] == 1.0
    spec = rows[("speculative", "decodekit", None)]
    assert spec["x_greedy"] == 2.0 and spec["gamma"] == 5 and spec["forwards_per_token"] == 0.5
    assert spec["acceptance_rate"] == 0.5 and spec["mean_accepted_length"] == 2.5
    assert rows[("speculative", "decodekit", 2)]["swept"]
    assert rows[("beam", "decodekit", None)]["tokens_per_s"] is None
    assert greedy["decode_ms_per_token"] is None and spec["decode_x_greedy"] is None  # peers, old records


def test_the_decode_rate_leaves_the_prefill_out():
    """A strategy whose output is shorter spreads the same prefill over fewer tokens: its
    tokens/s falls though each decoded token costs what greedy's does."""
    results = _results()
    runs = {(r["strategy"], r["gamma"]): r for r in results["runs"] if r["impl"] == "decodekit"}
    # greedy: 1 s prefill + 40 tokens at 10 ms; speculative: the same prefill + 10 tokens at 10 ms
    runs[("greedy", None)]["trials"] = [{"seconds": 1.4, "tokens": 41, "suites": {}, "decode_seconds": 0.4, "decode_tokens": 40}]
    runs[("speculative", None)]["trials"] = [{"seconds": 1.1, "tokens": 11, "suites": {},
                                             "decode_seconds": 0.1, "decode_tokens": 10}]
    rows = {(r["strategy"], r["impl"], r["gamma"] if r["swept"] else None): r for r in summarize(results)}
    spec = rows[("speculative", "decodekit", None)]
    assert spec["x_greedy"] == pytest.approx((11 / 1.1) / (41 / 1.4))  # 0.34: the prefill's share
    assert spec["decode_ms_per_token"] == pytest.approx(10.0) and spec["decode_x_greedy"] == pytest.approx(1.0)


def test_report_json_and_plots(tmp_path):
    paths = write_outputs(_results(), tmp_path)
    names = {p.name for p in paths}
    assert {"report.md", "results.json", "tokens_per_s.png", "acceptance_histogram.png",
            "speedup_vs_gamma.png"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"][1]["strategy"] == "greedy"
    report = (tmp_path / "report.md").read_text()
    assert "decodekit bench --quick" in report and "Test CPU" in report
    assert "| float32 | 1 | 25.0 | 11.0 | 50.0 | 2.27 | 0.50 | 1.00 |" in report  # issue 2's table
    assert "25.0 (20.0–30.0)" in report and "3/3" in report and "75%" in report
    assert "RuntimeError: boom" in report and "gamma=2" in report
    # a saved results.json can be rendered again
    assert render_report(saved) == report


# ---------------------------------------------------------------------------- end to end
def _save_tiny_model(folder):
    """A tiny Llama + a character-level tokenizer whose ids fit its 97-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,?!'-+:\n"
    vocab = {"<pad>": PAD, "<s>": 1, "<unk>": 2, "</s>": EOS}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    tiny_llama(seed=1).save_pretrained(folder)
    fast.save_pretrained(folder)


def test_tiny_end_to_end_bench(tmp_path, capsys):
    model_dir, out = tmp_path / "tiny", tmp_path / "out"
    _save_tiny_model(model_dir)
    argv = ["bench", "--model", str(model_dir), "--suite", "qa", "--num_prompts", "2", "--trials", "1",
            "--max_new_tokens", "4", "--batch_sizes", "1,2", "--gammas", "2", "--drafter", "layers:1",
            "--threads", "1", "--strategies", "greedy,sample,speculative,prompt_lookup",
            "--output_dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bandwidth" in printed and "floor" in printed  # the card comes first
    results = json.loads((out / "results.json").read_text())
    runs = {r["key"]: r for r in results["runs"]}
    greedy = runs["greedy/decodekit float32 b1"]
    assert greedy["error"] is None and greedy["trials"][0]["tokens"] > 0
    trial = greedy["trials"][0]  # 2 prompts x 4 tokens, the first of each row after its prefill
    assert trial["decode_tokens"] == 2 * 3 and 0 < trial["decode_seconds"] < trial["seconds"]
    assert "decode_tokens" not in runs["greedy/transformers float32 b1"]["trials"][0]
    assert runs["greedy/transformers float32 b1"]["identical_to_greedy"] == "2/2"
    assert runs["greedy/decodekit float32 b2"]["identical_to_transformers"] == "2/2"
    assert runs["prompt_lookup/decodekit float32 b1"]["identical_to_greedy"] == "2/2"
    assert runs["floor/floor float32 b2"]["trials"][0]["tokens"] == 2 * 4
    for p in ("report.md", "tokens_per_s.png"):
        assert (out / p).stat().st_size > 0
    assert "## float32, batch 2" in (out / "report.md").read_text()


def test_cost_curves_are_measured_before_the_trials(tmp_path, monkeypatch):
    """Drafting runs at batch 2 need the curves of buckets 2 and 1 (rows leave as they finish)
    up to their widest verify forward: none of it may be measured inside a timed trial."""

    model_dir, out = tmp_path / "tiny", tmp_path / "out"
    _save_tiny_model(model_dir)
    real_trials, new_points = bench_cli.run_trials, {}

    def trials(ctx, runs):
        before = {key: set(c.points) for key, c in costs.CURVES.items()}
        assert {key[1] for key in before} >= {1, 2}
        done = real_trials(ctx, runs)
        for key, curve in costs.CURVES.items():
            if set(curve.points) - before.get(key, set()):
                new_points[key] = set(curve.points) - before.get(key, set())
        return done

    monkeypatch.setattr(bench_cli, "run_trials", trials)
    argv = ["bench", "--model", str(model_dir), "--suite", "qa", "--num_prompts", "3", "--trials", "1",
            "--max_new_tokens", "6", "--batch_sizes", "2", "--gammas", "", "--threads", "1",
            "--strategies", "greedy,prompt_lookup,ngram", "--no_transformers", "--output_dir", str(out)]
    assert main(argv) == 0
    assert new_points == {}


def test_ctrl_c_writes_what_was_measured(tmp_path, monkeypatch):
    model_dir, out = tmp_path / "tiny", tmp_path / "out"
    _save_tiny_model(model_dir)
    real_measure, calls = runners.measure, []

    def measure_then_interrupt(ctx, run, first_trial):
        calls.append(run.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_measure(ctx, run, first_trial)

    monkeypatch.setattr(runners, "measure", measure_then_interrupt)
    argv = ["bench", "--model", str(model_dir), "--strategies", "greedy", "--suite", "qa",
            "--num_prompts", "1", "--trials", "2", "--max_new_tokens", "3", "--batch_sizes", "1",
            "--output_dir", str(out)]
    assert main(argv) == 130
    results = json.loads((out / "results.json").read_text())
    assert results["completed"] is False
    assert sum(len(r["trials"]) for r in results["runs"]) == 2
    assert "Interrupted" in (out / "report.md").read_text()
