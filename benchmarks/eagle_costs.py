"""What the shipped EAGLE head costs against a target forward, and how fast the target
generates training data (``decodekit train-drafter``'s bottleneck) on this machine.

    python benchmarks/eagle_costs.py --dtypes float32,bfloat16 --batch_sizes 1,4

Prints, per dtype and batch size, one head drafting step (``EagleDrafter.step_cost``)
against the target's forward of 1, 2, 4 and 6 tokens per row (``forward_cost_curve``), then
the target's greedy generation throughput at ``--gen_batch_sizes`` (64 new tokens per row).
"""

from __future__ import annotations

import argparse
import time

import torch

import decodekit as dk
from decodekit.cache import left_pad
from decodekit.io import encode_prompts
from decodekit.strategies.draft_policy import forward_cost_curve
from decodekit.strategies.eagle import resolve_eagle
from decodekit.strategies.eagle.train import training_prompts


def head_costs(model, dtype: str, batch_sizes: list[int]) -> None:
    drafter = resolve_eagle("eagle", model)
    for batch in batch_sizes:
        curve = forward_cost_curve(model, 6, batch=batch)
        step = drafter.step_cost(batch)
        ts = " ".join(f"t({n}) {curve(n) * 1e3:.1f}" for n in (1, 2, 4, 6))
        print(f"{dtype} b{batch}: head step {step * 1e3:.1f} ms | target ms: {ts} | head / t(1) {step / curve(1):.3f}")


@torch.inference_mode()
def generation_speed(model, tokenizer, dtype: str, batch_sizes: list[int]) -> None:
    prompts = training_prompts(max(batch_sizes), 1)
    for batch in batch_sizes:
        ids, mask = left_pad(encode_prompts(tokenizer, prompts[:batch], True), 0)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                       pad_token_id=0)
        print(f"{dtype} generation b{batch}: {batch * 64 / (time.perf_counter() - t0):.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--batch_sizes", default="1,4")
    parser.add_argument("--gen_batch_sizes", default="32,64")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes.split(","):
        model, tokenizer = dk.load_model("smollm2-135m-instruct", dtype=dtype)
        head_costs(model, dtype, [int(b) for b in args.batch_sizes.split(",")])
        generation_speed(model, tokenizer, dtype, [int(b) for b in args.gen_batch_sizes.split(",") if b])


if __name__ == "__main__":
    main()
