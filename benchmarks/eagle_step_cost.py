"""What one EAGLE draft step costs against one forward of its target, per target dtype.

    python benchmarks/eagle_step_cost.py --dtypes int8,float32 --output_dir DIR

A draft step is what ``EagleDrafter`` does per drafted token: one cached forward of the shipped
head as ``--drafter eagle`` loads it (int8 weights for a target on decodekit's int8 kernel;
``HeadModel`` through ``ModelState``, after ``CONTEXT`` tokens) and its draft-vocabulary logits,
widened to the full vocabulary, argmax. The target's one-token forward is timed the same
way (``decodekit.costs.measure_forwards``). Interleaved rounds, fastest of each; a drafting
policy pays ``ratio`` of a greedy step per draft.
"""

from __future__ import annotations

import argparse
import time

import torch
from reports import check_output_dir, write_report

import decodekit as dk
from decodekit.cache import ModelState
from decodekit.costs import CONTEXT, measure_forwards
from decodekit.strategies.eagle.drafter import resolve_eagle
from decodekit.strategies.eagle.head import HeadModel


def head_step(head, head_model: HeadModel, state: ModelState, token: torch.Tensor) -> float:
    """Seconds of one draft step after the head's context (the state is cropped back)."""
    head_model.features = torch.zeros(1, 1, head.config.hidden_size, dtype=head.fc.weight.dtype)
    t0 = time.perf_counter()
    hidden = state.extend(token, logits_to_keep=1)[:, -1]  # [1, H]
    head.full_logits(head.logits(hidden)).float().argmax(-1)
    seconds = time.perf_counter() - t0
    state.crop(1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="int8,float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output_dir", default=None, help="write report.md and results.json here (a new folder)")
    args = parser.parse_args()
    out = check_output_dir(parser, args.output_dir)
    setups = {}
    for dtype in args.dtypes.split(","):
        model = dk.load_model(dtype=dtype)[0]
        head = resolve_eagle("eagle", model).head
        head_model = HeadModel(head)
        ids = torch.randint(4, 40000, (1, CONTEXT), generator=torch.Generator().manual_seed(0))  # [1, CONTEXT]
        head_model.features = torch.zeros(1, CONTEXT, head.config.hidden_size, dtype=head.fc.weight.dtype)
        state, _ = ModelState.prefill(head_model, ids)
        setups[dtype] = (model, head, head_model, state, ids[:, :1])
    best = {d: {"step": float("inf"), "target": float("inf")} for d in setups}
    for _ in range(args.rounds):
        for dtype, (model, head, head_model, state, token) in setups.items():
            step = min(head_step(head, head_model, state, token) for _ in range(5))
            best[dtype]["step"] = min(best[dtype]["step"], step)
            best[dtype]["target"] = min(best[dtype]["target"], measure_forwards(model, [1], 1, 2)[1])
    lines = ["| target dtype | head weights | draft step ms | target t(1) ms | step / t(1) |", "|---|---|---|---|---|"]
    for dtype, b in best.items():
        head = setups[dtype][1]
        head_dtype = "int8" if head.shared.lm_int8 is not None else str(head.fc.weight.dtype).removeprefix("torch.")
        lines.append(f"| {dtype} | {head_dtype} | {b['step'] * 1000:.2f} | {b['target'] * 1000:.1f} | "
                     f"{b['step'] / b['target']:.3f} |")
    print("\n".join(lines))
    if out is not None:
        write_report(out, "EAGLE draft step cost", lines, dict(args=vars(args), best=best))


if __name__ == "__main__":
    main()
