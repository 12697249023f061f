"""Self-distillation data for draft-head learning curves (``benchmarks/eagle_curves.py``).

    python benchmarks/eagle_data.py --out DIR [--prompts 1800] [--passages 400] [--max_new_tokens 96]

Writes, into a new folder ``DIR``, shards of the target's own answers with its hidden states and
top-8 next-token distribution (``decodekit.strategies.eagle.train.collect``):

- ``heldout_chat.pt``: greedy answers to the chat suite (16 prompts, never trained on);
- ``heldout_other.pt``: greedy answers to ``OTHER_PROMPTS`` below (kinds and subjects the
  training prompts do not have: planning, recipes, how things work at home, SQL, letters of
  complaint, jokes, definitions...);
- ``train_NNN.pt``: answers to ``training_prompts`` (every kind, round-robin), greedy and
  sampled batches alternating, then ``passage_NNN.pt``: answers to ``passage_prompts`` built from
  the greedy training answers (summarise, rewrite, list, quote, correct).

Each shard is written when its batches finish (a stopped run keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import decodekit as dk
from decodekit.strategies.eagle.prompts import kind_of, passage_prompts, training_prompts
from decodekit.strategies.eagle.train import TrainConfig, collect
from decodekit.suites import load_suite

OTHER_PROMPTS = [
    "Plan a birthday party for a seven-year-old.", "How does a refrigerator keep food cold?",
    "Write a thank-you note to a neighbour who watered my plants.", "What is a good way to organize a messy closet?",
    "Write an SQL query that returns the ten most recent orders from a table called orders.",
    "Tell me a joke about computers.", "Define the word 'resilience' and use it in a sentence.",
    "Write a polite complaint to a hotel about a noisy room.", "How do I change a flat tire on a car?",
    "Suggest a name for a new bakery and explain why it fits.", "What is the difference between a virus and a "
    "bacterium?", "Write a recipe for a simple vegetable soup.", "What is the best way to learn to juggle?",
    "Describe a busy train station at rush hour.", "What is inflation, and why do prices go up?",
    "Write a short motivational message for a student before exams.", "Why do some countries drive on the left?",
    "Give me a packing list for a business trip to a cold city.", "How do noise-cancelling headphones work?",
    "Write a short bedtime story about a sleepy dragon.", "What are the rules of tic-tac-toe?",
    "Explain what a mortgage is to a first-time home buyer.", "Write a limerick about a forgetful wizard.",
    "How should I clean a cast iron pan?",
]


def save(path: Path, samples: list[dict], prompts: list[str], seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(dict(samples=samples, prompts=prompts, kinds=[kind_of(p) for p in prompts], seconds=seconds), tmp)
    tmp.replace(path)
    tokens = sum(int((s["greedy"] >= 0).sum()) for s in samples)
    print(f"{path.name}: {len(samples)} answers, {tokens} generated tokens, {seconds:.0f} s", flush=True)


def run(model, tokenizer, out: Path, name: str, prompts: list[str], cfg: TrainConfig, sampled=None) -> list[dict]:
    t0 = time.perf_counter()
    samples = collect(model, tokenizer, prompts, cfg, sampled=sampled)
    save(out / f"{name}.pt", samples, prompts, time.perf_counter() - t0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a new folder")
    parser.add_argument("--prompts", type=int, default=1800, help="training prompts (0: the held-out sets only)")
    parser.add_argument("--passages", type=int, default=400)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=48)
    parser.add_argument("--shard", type=int, default=192, help="prompts per shard")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    model, tokenizer = dk.load_model()
    cfg = TrainConfig(max_new_tokens=128, gen_batch_size=args.batch_size)
    run(model, tokenizer, out, "heldout_chat", [r["prompt"] for r in load_suite("chat")], cfg, sampled=False)
    run(model, tokenizer, out, "heldout_other", OTHER_PROMPTS, cfg, sampled=False)
    cfg = TrainConfig(max_new_tokens=args.max_new_tokens, gen_batch_size=args.batch_size)
    prompts = training_prompts(args.prompts, seed=0) if args.prompts else []  # 0: the held-out sets only
    answers = []
    for i in range(0, len(prompts), args.shard):
        chunk = prompts[i: i + args.shard]
        samples = run(model, tokenizer, out, f"train_{i // args.shard:03d}", chunk, cfg)
        greedy_rows = [s for j, s in enumerate(samples) if (j // cfg.gen_batch_size) % 2 == 0]
        answers += [tokenizer.decode(s["tokens"][s["prompt"]:], skip_special_tokens=True) for s in greedy_rows]
    passages = passage_prompts(answers, seed=0)[: args.passages]
    for i in range(0, len(passages), args.shard):
        run(model, tokenizer, out, f"passage_{i // args.shard:03d}", passages[i: i + args.shard], cfg)
    (out / "done.json").write_text(json.dumps(vars(args)))


if __name__ == "__main__":
    main()
