"""Forward cost curves: seconds of one cached forward of B rows with n new tokens each, the
curve the draft-length policies read (``decodekit.strategies.draft_policy.forward_cost_curve``).

    python benchmarks/forward_costs.py --dtypes float32,llama.cpp,llama.cpp:q4_0 --batch_sizes 1,4

A flat curve (t(n) close to t(1)) lets drafts be verified almost for free; a curve that grows
with n as fast as n (compute-bound kernels) leaves speculation nothing to gain. Prints one row
per dtype and batch size: t(1) in ms and t(n) / t(1).
"""

from __future__ import annotations

import argparse

import decodekit as dk
from decodekit.bench.config import gguf_type, is_llama_cpp
from decodekit.strategies.draft_policy import forward_cost_curve

POINTS = (1, 2, 3, 4, 6, 8)


def load(dtype: str):
    if is_llama_cpp(dtype):
        return dk.load_model(backend="llama.cpp", dtype=gguf_type(dtype))[0]
    return dk.load_model(dtype=dtype)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,llama.cpp")
    parser.add_argument("--batch_sizes", default="1,4")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print("| dtype | batch | t(1) ms | " + " | ".join(f"t({n})/t(1)" for n in POINTS[1:]) + " |")
    print("|---" * (3 + len(POINTS) - 1) + "|")
    for dtype in args.dtypes.split(","):
        model = load(dtype)
        for batch in batch_sizes:
            curve = forward_cost_curve(model, max(POINTS), batch=batch)
            base = curve(1)
            ratios = " | ".join(f"{curve(n) / base:.2f}" for n in POINTS[1:])
            print(f"| {dtype} | {batch} | {base * 1000:.1f} | {ratios} |", flush=True)
        del model


if __name__ == "__main__":
    main()
