"""What history-aware processing costs: greedy and prompt lookup, with and without
``repetition_penalty``, on the bundled model, interleaved trials in one process.

    python benchmarks/processors_bench.py --suite grounded --num_prompts 4 --max_new_tokens 64 --trials 3

Prints seconds per token (median over trials) per configuration and the two ratios the
sampling-toolbox issue asks for: the overhead of history processing on plain greedy, and how
much of prompt lookup's speed-up over greedy survives a repetition penalty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import decodekit as dk
from decodekit.suites import load_suite

CONFIGS = {
    "greedy": dict(strategy="greedy"),
    "greedy + repetition_penalty": dict(strategy="greedy", repetition_penalty=1.1),
    "prompt_lookup": dict(strategy="prompt_lookup"),
    "prompt_lookup + repetition_penalty": dict(strategy="prompt_lookup", repetition_penalty=1.1),
}


def seconds_per_token(model, rows, options: dict, max_new_tokens: int) -> float:
    start = time.perf_counter()
    tokens = 0
    for row in rows:  # batch 1
        out = dk.generate(model, [row], max_new_tokens=max_new_tokens, **options)
        tokens += out.total_new_tokens
    return (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="grounded")
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    model, tok = dk.load_model(dtype=args.dtype)
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in load_suite(args.suite)][: args.num_prompts]
    rows = dk.encode_prompts(tok, prompts, use_chat_template=True)
    seconds_per_token(model, rows[:1], CONFIGS["greedy"], 8)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.trials):  # interleaved: every configuration once per trial
        for name, options in CONFIGS.items():
            times[name].append(seconds_per_token(model, rows, options, args.max_new_tokens))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:38s} {1000 * t:7.2f} ms/token  ({1 / t:6.1f} tokens/s)")
    overhead = med["greedy + repetition_penalty"] / med["greedy"] - 1
    speedup = med["greedy"] / med["prompt_lookup"]
    speedup_rp = med["greedy + repetition_penalty"] / med["prompt_lookup + repetition_penalty"]
    print(f"history-processing overhead on greedy: {100 * overhead:+.1f}%")
    print(f"prompt_lookup speed-up over greedy: {speedup:.2f}x plain, {speedup_rp:.2f}x with "
          f"repetition_penalty ({100 * (1 - (speedup_rp - 1) / (speedup - 1)):.0f}% of the gain lost)")
    print(json.dumps({"torch_threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype),
                      "ms_per_token": {k: round(1000 * v, 3) for k, v in med.items()}}))


if __name__ == "__main__":
    main()
