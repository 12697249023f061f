"""Forward cost curves: seconds of one cached forward of B rows with n new tokens each, the
curve the draft-length policies read (``decodekit.costs.forward_cost_curve``).

    python benchmarks/forward_costs.py --dtypes float32,bfloat16,int8 --batch_sizes 1,4 --output_dir DIR

A flat curve (t(n) close to t(1)) lets drafts be verified almost for free; a curve that grows
with n as fast as n (compute-bound kernels) leaves speculation nothing to gain. Every dtype is
loaded first, then ``--rounds`` rounds time each dtype and batch size in turn (interleaved, so
the machine's noise falls on all of them alike), each point keeping its fastest run. Prints
(and with ``--output_dir`` writes to a report) one row per dtype and batch size: t(1) in ms
and t(n) / t(1). llama.cpp dtypes (``llama.cpp``, ``llama.cpp:q4_0``...) run on that backend;
``int8:torch`` is int8 on PyTorch's ``_weight_int8pack_mm`` instead of decodekit's kernel.
"""

from __future__ import annotations

import argparse
import os

import torch
from reports import check_output_dir, write_report

import decodekit as dk
from decodekit.bench.config import gguf_type, is_llama_cpp
from decodekit.costs import CONTEXT, measure_forwards

POINTS = (1, 2, 3, 4, 6, 8)


def load(dtype: str):
    if is_llama_cpp(dtype):
        return dk.load_model(backend="llama.cpp", dtype=gguf_type(dtype))[0]
    if dtype == "int8:torch":  # QuantLinear reads the choice when the model loads
        os.environ["DECODEKIT_INT8_KERNEL"] = "torch"
        try:
            return dk.load_model(dtype="int8")[0]
        finally:
            del os.environ["DECODEKIT_INT8_KERNEL"]
    return dk.load_model(dtype=dtype)[0]


def measure(models: dict, batch_sizes: list[int], rounds: int) -> dict:
    """``{dtype: {batch: {n: fastest seconds}}}``, the dtypes and batch sizes timed in turn."""
    best = {d: {b: {} for b in batch_sizes} for d in models}
    for _ in range(rounds):
        for dtype, model in models.items():
            for batch in batch_sizes:
                for n, seconds in measure_forwards(model, list(POINTS), batch, 2).items():
                    best[dtype][batch][n] = min(seconds, best[dtype][batch].get(n, seconds))
    return best


def table(best: dict) -> list[str]:
    lines = ["| dtype | batch | t(1) ms | " + " | ".join(f"t({n})/t(1)" for n in POINTS[1:]) + " |",
             "|---" * (3 + len(POINTS) - 1) + "|"]
    for dtype, per_batch in best.items():
        for batch, points in per_batch.items():
            ratios = " | ".join(f"{points[n] / points[1]:.2f}" for n in POINTS[1:])
            lines.append(f"| {dtype} | {batch} | {points[1] * 1000:.1f} | {ratios} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--batch_sizes", default="1,4")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--output_dir", default=None, help="write report.md and results.json here (a new folder)")
    args = parser.parse_args()
    out_dir = check_output_dir(parser, args.output_dir)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    models = {dtype: load(dtype) for dtype in args.dtypes.split(",")}
    best = measure(models, batch_sizes, args.rounds)
    lines = table(best)
    print("\n".join(lines), flush=True)
    if out_dir is not None:
        notes = ["", f"Context {CONTEXT} tokens, bundled model; fastest of {2 * args.rounds} runs per point "
                 f"({args.rounds} interleaved rounds); torch {torch.get_num_threads()} threads."]
        write_report(out_dir, "Forward cost curves t(n, B)", lines + notes,
                     {"points": {d: {str(b): {str(n): s for n, s in p.items()} for b, p in per.items()}
                                 for d, per in best.items()}})


if __name__ == "__main__":
    main()
