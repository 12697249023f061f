"""The ``decodekit bench`` subcommand: arguments, then card, plan, warm-up, trials, report."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from decodekit.bench.card import format_card, machine_card
from decodekit.bench.checks import check_identity, score_quality
from decodekit.bench.config import (
    DTYPE_CHOICES,
    LLAMA_CPP,
    PRESETS,
    SUITE_CHOICES,
    BenchConfig,
    gguf_type,
    is_llama_cpp,
    resolve_config,
)
from decodekit.bench.report import summarize, write_outputs
from decodekit.bench.runners import (
    Context,
    make_batches,
    plan_runs,
    run_record,
    run_trials,
    warm_up,
)
from decodekit.model_info import default_eos_pad

__all__ = ["add_arguments", "run", "run_bench", "load_models"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def flag(name, **kw):
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*spellings, dest=name, **kw)

    flag("preset", default="default", help=f"one of {', '.join(PRESETS)} (flags given win)")
    flag("model", default=None, help="model name, HF dir or .gguf (default: the bundled model)")
    flag("strategies", default=None, help="comma list (default: every available strategy)")
    flag("suite", default=None, help=f"one of {', '.join(SUITE_CHOICES)} (default all)")
    flag("num_prompts", type=int, default=None, help="prompts taken from each suite (default 2)")
    flag("batch_sizes", default=None, help="comma list (default 1,4)")
    flag("dtypes", default=None, help=f"comma list of {', '.join(DTYPE_CHOICES)} (default float32; "
                                       "quality is scored under the first)")
    flag("trials", type=int, default=None, help="interleaved trials (default 3)")
    flag("max_new_tokens", type=int, default=None, help="default 32")
    flag("gammas", default=None, help="draft lengths swept at batch 1 (default 2,8; '' = none)")
    flag("drafter", default="layers:24", help="speculative drafter: layers:N or a model (default layers:24)")
    flag("ignore_eos", action="store_const", const=True, default=None,
         help="decode exactly max_new_tokens per row (fixed-length throughput)")
    flag("no_transformers", action="store_true", help="skip transformers' generate() runs")
    flag("backend", default=None, help="torch | llama.cpp: llama.cpp = decodekit on the llama.cpp backend "
                                       "(the GGUF's own weights; same as --dtypes llama.cpp)")
    flag("peers", default=None, help="llama.cpp: add llama.cpp's own greedy and prompt lookup "
                                     "(llama-cpp-python, same GGUF and prompts) as rows")
    flag("threads", type=int, default=None, help="torch threads (default: torch's choice)")
    flag("clock", default="wall", help="wall | cpu: cpu = this process's CPU seconds, steadier on a "
                                       "shared machine with --threads 1 (default wall)")
    flag("device", default="cpu", help="cpu | cuda (default cpu)")
    flag("output_dir", default="bench-results", help="where report.md, results.json, plots go")
    flag("quick", action="store_true", help="same as --preset quick (under 3 minutes)")


def load_models(cfg: BenchConfig):
    """One model per dtype (and the tokenizer)."""
    from decodekit.models import load_model

    models, tokenizer = {}, None
    for dtype in cfg.dtypes:
        if is_llama_cpp(dtype):
            models[dtype], tokenizer = load_model(cfg.model, backend=LLAMA_CPP, dtype=gguf_type(dtype))
        else:
            models[dtype], tokenizer = load_model(cfg.model, dtype=dtype, device=cfg.device)
    return models, tokenizer


def _eos_pad(model) -> tuple[list[int], int]:
    """The model's EOS ids (a list) and pad id (its EOS when it has none, else 0)."""
    eos, pad = default_eos_pad(model)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos, pad if pad is not None else 0


def run_bench(cfg: BenchConfig, models: dict, tokenizer, model_name: str) -> tuple[dict, bool]:
    """Card, plan, warm-up, trials, summaries; returns (results, completed)."""
    card = machine_card(models, cfg.device, model_name)
    print(format_card(card), flush=True)
    eos, pad = _eos_pad(next(iter(models.values())))
    batches = {bs: make_batches(tokenizer, cfg, bs, pad) for bs in cfg.batch_sizes}
    ctx = Context(cfg, models, tokenizer, batches, eos, pad)
    runs = plan_runs(cfg)
    started = time.perf_counter()
    warm_up(ctx, runs)
    completed = run_trials(ctx, runs)
    check_identity(runs)
    if completed:
        score_quality(ctx, runs)
    results = {
        "card": card,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "completed": completed,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "prompts": dict(Counter(s for b in batches[cfg.batch_sizes[0]] for s in b.suites)),
        "runs": [run_record(r) for r in runs],
    }
    results["summary"] = summarize(results)
    return results, completed


def run(args: argparse.Namespace) -> int:
    """The ``decodekit bench`` subcommand."""
    cfg = resolve_config(args)
    from decodekit.models import DEFAULT_MODEL

    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        models, tokenizer = load_models(cfg)
        results, completed = run_bench(cfg, models, tokenizer, cfg.model or DEFAULT_MODEL)
    finally:
        torch.set_num_threads(threads)
    results["command"] = "decodekit bench " + " ".join(_argv_echo(args))
    paths = write_outputs(results, cfg.output_dir)
    print("\n".join(f"wrote {p}" for p in paths), flush=True)
    return 0 if completed else 130


def _argv_echo(args: argparse.Namespace) -> list[str]:
    skip = {"func", "command", "verbose"}
    out = []
    for k, v in vars(args).items():
        if k in skip or v is None or v is False or (k == "preset" and v == "default"):
            continue
        out.append(f"--{k}" if v is True else f"--{k} {v}")
    return out
