"""After the trials: identity (token-identical rows) and quality of each run's output."""

from __future__ import annotations

import logging
import statistics

from decodekit.bench.config import ENTRY_BY_NAME, is_llama_cpp
from decodekit.bench.runners import Context, Run

__all__ = ["check_identity", "score_quality"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- identity
def _find(runs: list[Run], strategy: str, impl: str, dtype: str, bs: int) -> Run | None:
    for r in runs:
        if (r.strategy, r.impl, r.dtype, r.batch_size, r.gamma) == (strategy, impl, dtype, bs, None):
            return r
    return None


def _same_rows(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b, strict=False))}/{len(b)}"


def check_identity(runs: list[Run]) -> None:
    """Token-identical rows (``"k/n"``): lossless strategies (ours and transformers')
    against our greedy, and each of our runs against its transformers twin (same
    dtype and batch size)."""
    for run in runs:
        entry = ENTRY_BY_NAME.get(run.strategy)
        if entry is None or run.sequences is None or run.gamma is not None:
            continue
        greedy = _find(runs, "greedy", "decodekit", run.dtype, run.batch_size)
        if entry.lossless and greedy is not None and greedy.sequences and greedy is not run:
            run.identical_to_greedy = _same_rows(run.sequences, greedy.sequences)
        twin = _find(runs, run.strategy, "transformers", run.dtype, run.batch_size)
        if run.impl == "decodekit" and twin is not None and twin.sequences:
            run.identical_to_transformers = _same_rows(run.sequences, twin.sequences)


# ---------------------------------------------------------------------------- quality
def score_quality(ctx: Context, runs: list[Run]) -> None:
    """Continuation log-likelihood (per token, under the first dtype's model), distinct-2
    and, on the qa suite, exact-match accuracy, for the runs at the smallest batch size."""
    try:
        from decodekit.quality import continuation_loglik, distinct_n, exact_match
    except ImportError:  # pragma: no cover - quality lands with the EIS issue
        log.warning("decodekit.quality is not available: quality columns left empty")
        return
    scorer = next((ctx.models[d] for d in ctx.cfg.dtypes if not is_llama_cpp(d)), None)  # a torch model
    if scorer is None:
        log.warning("quality is scored by a torch model: run a torch dtype beside llama.cpp to get it")
        return
    bs = ctx.cfg.batch_sizes[0]
    prompts = [row for b in ctx.batches[bs] for row in zip(b.suites, b.records, b.prompt_ids, strict=True)]
    for run in runs:
        if run.impl == "floor" or run.sequences is None or run.batch_size != bs or run.gamma is not None:
            continue
        logliks, em = [], []
        for (suite, rec, prompt_ids), seq in zip(prompts, run.sequences, strict=False):
            if seq:
                logliks.append(continuation_loglik(scorer, prompt_ids, seq)[1])
            if suite == "qa" and "answer" in rec:
                em.append(exact_match(ctx.tokenizer.decode(seq, skip_special_tokens=True), rec["answer"]))
        run.quality = {
            "loglik_per_token": statistics.mean(logliks) if logliks else None,
            "distinct_2": distinct_n(run.sequences, 2),
            "exact_match": (sum(em) / len(em)) if em else None,
            "qa_prompts": len(em),
        }
