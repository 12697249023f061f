"""Where a decode's time goes after the prefill: the target's forward calls, and the loop around
them (drafting, the policy, verification, bookkeeping), per strategy, dtype and batch size.

    python benchmarks/decode_split.py --dtypes llama.cpp,llama.cpp:q4_0 --strategies greedy,prompt_lookup \
        --batch_sizes 1,4 --output_dir DIR

Every model is loaded first; then ``--rounds`` rounds run each batch of prompts with every
strategy in turn (interleaved, in one process, so the machine's noise falls on all alike, and
each strategy's cost curve is measured before the first round). Time counts from each row's
first token (``RequestStats.first_token_seconds``) to the batch's last, so a strategy whose
output ends sooner is not charged a larger share of the prefill; the target's forwards are
timed with forward hooks (every backend calls the model's ``forward``). Columns: decode ms
per token (all rows' tokens after their first) and its ratio to greedy's, the forwards' ms
per token, the loop's ms per target forward, target forwards per token (all rows' tokens: a
batch of 4 decoding together makes 0.25) and rows token-identical to greedy.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from forward_costs import load
from reports import check_output_dir, write_report

import decodekit as dk
from decodekit.suites import load_suite


class ForwardClock:
    """Seconds and calls of a model's forwards after the first one (the prefill)."""

    def __init__(self, model):
        self.calls, self.seconds, self.t0 = 0, 0.0, 0.0
        self.hooks = [model.register_forward_pre_hook(self.start), model.register_forward_hook(self.stop)]

    def start(self, *_):
        self.t0 = time.perf_counter()

    def stop(self, *_):
        if self.calls:
            self.seconds += time.perf_counter() - self.t0
        self.calls += 1

    def close(self):
        for hook in self.hooks:
            hook.remove()


def decode_batch(model, rows: list[list[int]], strategy: str, max_new_tokens: int) -> tuple[dict, list]:
    """One ``generate`` call: its decode part (``Counter`` of seconds, tokens, steps) and outputs."""
    clock = ForwardClock(model)
    try:
        out = dk.generate(model, rows, max_new_tokens=max_new_tokens, strategy=strategy)
    finally:
        clock.close()
    stats = [s for s in out.stats if s.new_tokens]
    wall = max(s.seconds for s in stats) - max(s.first_token_seconds for s in stats)
    return Counter(wall=wall, forward=clock.seconds, steps=max(clock.calls - 1, 0),
                   tokens=sum(s.new_tokens - 1 for s in stats)), out.sequences


def run(models: dict, batches: dict, strategies: list[str], rounds: int, max_new_tokens: int) -> dict:
    """``{(dtype, batch size, strategy): Counter}`` summed over rounds, and the first round's outputs."""
    totals, outputs = {}, {}
    for round_ in range(rounds):
        for dtype, model in models.items():
            for size, groups in batches.items():
                for group in groups:
                    for strategy in strategies:
                        part, seqs = decode_batch(model, group, strategy, max_new_tokens)
                        totals.setdefault((dtype, size, strategy), Counter()).update(part)
                        if round_ == 0:
                            outputs.setdefault((dtype, size, strategy), []).append(seqs)
    return {"totals": totals, "outputs": outputs}


def table(result: dict) -> list[str]:
    lines = ["| dtype | batch | strategy | decode ms/token | x greedy | forwards ms/token | loop ms/forward | "
             "forwards/token | = greedy rows |", "|---" * 9 + "|"]
    totals, outputs = result["totals"], result["outputs"]
    for (dtype, size, strategy), c in totals.items():
        greedy = totals.get((dtype, size, "greedy"))
        ms = 1000 * c["wall"] / c["tokens"]
        ratio = f"{(greedy['wall'] / greedy['tokens']) / (c['wall'] / c['tokens']):.2f}" if greedy else "–"
        same = "–"
        if greedy and strategy != "greedy":
            pairs = [(a, b) for x, y in zip(outputs[(dtype, size, strategy)], outputs[(dtype, size, "greedy")])
                     for a, b in zip(x, y)]
            same = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        lines.append(f"| {dtype} | {size} | {strategy} | {ms:.2f} | {ratio} | {1000 * c['forward'] / c['tokens']:.2f} | "
                     f"{1000 * (c['wall'] - c['forward']) / max(c['steps'], 1):.2f} | "
                     f"{c['steps'] / c['tokens']:.2f} | {same} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="llama.cpp,llama.cpp:q4_0")
    parser.add_argument("--strategies", default="greedy,prompt_lookup")
    parser.add_argument("--batch_sizes", default="1,4")
    parser.add_argument("--suite", default="grounded")
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output_dir", default=None, help="write report.md and results.json here (a new folder)")
    args = parser.parse_args()
    out = check_output_dir(parser, args.output_dir)
    strategies = args.strategies.split(",")
    if strategies[0] != "greedy":
        parser.error("--strategies must start with greedy (the reference)")
    tokenizer = dk.load_model()[1]
    rows = dk.encode_prompts(tokenizer, [p["prompt"] for p in load_suite(args.suite)[: args.num_prompts]],
                             use_chat_template=True)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    batches = {b: [rows[i : i + b] for i in range(0, len(rows), b)] for b in sizes}
    models = {dtype: load(dtype) for dtype in args.dtypes.split(",")}
    for model in models.values():  # cost curves and kernels before the timed rounds
        for groups in batches.values():
            for strategy in strategies:
                decode_batch(model, groups[0], strategy, 4)
    result = run(models, batches, strategies, args.rounds, args.max_new_tokens)
    lines = table(result)
    print("\n".join(lines))
    if out is not None:
        data = {"args": vars(args), "totals": {" ".join(map(str, k)): dict(v) for k, v in result["totals"].items()}}
        write_report(out, "Decode time split: forwards and the loop", lines, data)


if __name__ == "__main__":
    main()
