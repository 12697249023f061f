"""Extended Inference Sampler (EIS): spend more compute per token by looking ahead.

At every step the sampler takes the ``top_k`` most likely next tokens (the *candidates*),
rolls each one out for ``lookahead_steps`` more tokens, and picks the candidate with the
best extended score

    S(c) = log p(c | x) + sum_{t=1..L} d^t * log p(c_t | x, c, c_<t)

where ``x`` is the context, ``c_t`` the rollout tokens (argmax of the scoring distribution
with ``rollout_mode="greedy"``, sampled from it with ``"sample"``), ``L`` the lookahead
and ``d`` the discount factor (``discount_factor``). The chosen token is the argmax of ``S`` (as in the seed).

The scoring distribution: ``log_softmax(top_p_filtering(logits / temperature, top_p))``,
so with ``temperature=1, top_p=1`` it is the model's own log-softmax; a token removed by
top-p has log-probability ``-inf`` (a candidate outside the nucleus can never be chosen).
``temperature`` 0 or None means 1 (no scaling). A rollout that produces EOS has ended: its
later terms count 0 (the candidate EOS itself has no rollout terms at all). Since every
term is <= 0, this favours candidates that end soon, as any sum of log-probs does.

Cost: all ``B * top_k`` rollouts run as ONE batch sharing the context's KV cache
(``ModelState.fork`` with a ``repeat_interleave`` index; the prefix is never recomputed).
One EIS step feeds the candidates, then ``L - 1`` rollout tokens: ``L`` batched one-token
forwards. Nothing more is needed to advance, because the chosen candidate's own fork row
already holds the cache of ``x + c`` and the logits of the next position: the sampler crops
that row's rollout tokens and keeps it as the new context (so ``L`` forwards per token,
not ``L + 1``; with ``L = 0`` it is plain greedy decoding, one forward per token).

What is not reused: the chosen candidate's greedy rollout ``c_1..c_L`` is also the next
step's top-1 candidate and its rollout, but the other ``top_k - 1`` candidates need full
rollouts anyway, so the step still takes ``L`` forwards; reusing it would only remove one
row of ``top_k`` from the batch (measured on the 2-core CPU with SmolLM2-135M: a cached
one-token forward costs 139 ms for 1 row, 199 ms for 4, 232 ms for 5: about 15% saved, for
ragged bookkeeping). The reuse that is done saves one ``B``-row forward per token, about
one greedy step: EIS (L=3, top_k=5) measured 4.8x greedy's seconds per token (batch 1),
so about 5.8x without it (estimate: + one greedy step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from decodekit.cache import ModelState
from decodekit.model_info import vocab_size
from decodekit.processors import top_p_filtering
from decodekit.strategies.base import DecodeRequest, drop_finished
from decodekit.strategies.options import Options, option
from decodekit.validation import DecodeKitError, check_float, check_int, check_top_p

__all__ = ["EisOptions", "decode", "format_eis_trace", "ROLLOUT_MODES"]

log = logging.getLogger(__name__)

ROLLOUT_MODES = ("greedy", "sample")


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class EisOptions(Options):
    """Options of strategy ``"eis"``; ``top_k`` / ``temperature`` / ``top_p`` are its own: they
    shape the candidates and their scoring distribution."""

    lookahead_steps: int = option(3, "rollout tokens scored after each candidate (L)", int, min=0)
    discount_factor: float = option(0.9, "discount of rollout log-probs, in (0, 1]", float, max=1.0)
    top_k: int = option(5, "candidates per step", int, min=1)
    temperature: float | None = option(None, "temperature of the scoring distribution", float,
                                       min=0.0, optional=True)
    top_p: float | None = option(None, "nucleus filter of the scoring distribution", float,
                                 optional=True)
    rollout_mode: str = option("greedy", "how rollout tokens are chosen", str, choices=ROLLOUT_MODES)

    def validate(self) -> None:
        check_float("discount_factor", self.discount_factor, min_value=0.0, min_inclusive=False)
        if self.top_p is not None:
            check_top_p(self.top_p)
        if self.rollout_mode == "sample" and self.temperature is not None and self.temperature <= 0:
            raise DecodeKitError(f"temperature must be > 0 with rollout_mode='sample', got {self.temperature}")

    def scoring(self, vocab: int) -> tuple[float, float]:
        """``(temperature, top_p)`` with defaults filled in, once the vocabulary is known."""
        check_int("top_k", self.top_k, max_value=vocab)
        temperature = 1.0 if not self.temperature else float(self.temperature)
        return temperature, 1.0 if self.top_p is None else float(self.top_p)


# ---------------------------------------------------------------------- scoring
class RolloutScorer:
    """The scoring distribution and how rollouts pick their tokens."""

    def __init__(self, temperature: float, top_p: float, greedy: bool, generator, eos_ids):
        self.temperature = temperature
        self.top_p = top_p
        self.greedy = greedy
        self.generator = generator
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)

    def log_probs(self, logits: Tensor) -> Tensor:
        """``[N, V]`` logits -> ``[N, V]`` float32 log-probs (``-inf`` outside the nucleus)."""
        scaled = logits.float() / self.temperature
        return torch.log_softmax(top_p_filtering(scaled, self.top_p), dim=-1)

    def pick(self, logp: Tensor) -> Tensor:
        """``[N, V]`` log-probs -> ``[N]`` rollout tokens."""
        if self.greedy:
            return logp.argmax(dim=-1)
        return torch.multinomial(logp.exp(), 1, generator=self.generator)[:, 0]

    def is_eos(self, tokens: Tensor) -> Tensor:
        """``[N]`` -> ``[N]`` bool."""
        return torch.isin(tokens, self.eos.to(tokens.device))


def rollout(state: ModelState, logits: Tensor, alive: Tensor, steps: int, discount: float, scorer: RolloutScorer):
    """Roll ``N`` rows forward ``steps`` tokens from ``logits [N, V]`` (the next-token
    logits after each row's last token); returns the discounted sum
    ``sum_t discount^t log p(c_t | ...)`` ``[N]`` and the number of model calls made
    (read from ``state``, which counts them for the statistics too).

    ``alive [N]`` marks rows that have not ended (ended rows add 0). The last rollout
    token is scored but never fed, so ``steps - 1`` forwards are made.
    """
    future = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)  # [N]
    forwards_before = state.forwards
    for t in range(1, steps + 1):
        logp = scorer.log_probs(logits)  # [N, V]
        tokens = scorer.pick(logp)  # [N]
        term = logp.gather(-1, tokens[:, None])[:, 0]  # [N]
        future = future + torch.where(alive, discount**t * term, torch.zeros_like(term))
        alive = alive & ~scorer.is_eos(tokens)
        if t < steps:
            logits = state.extend(tokens[:, None])[:, -1]  # [N, V]
    return future, state.forwards - forwards_before


def eis_step(state: ModelState, logits: Tensor, top_k: int, steps: int, discount: float, scorer: RolloutScorer):
    """One EIS step for ``B`` rows with next-token ``logits [B, V]``.

    Returns ``(chosen [B], state, next_logits [B, V], info)``: the new state holds
    ``x + chosen`` and ``next_logits`` are its next-token logits (with ``steps == 0`` the
    state is unchanged and ``next_logits`` is None: the caller feeds ``chosen``); ``info``
    holds the candidates ``[B, k]``, their log-probs ``[B, k]`` and extended scores ``[B, k]``.
    """
    batch = logits.shape[0]
    logp = scorer.log_probs(logits)  # [B, V]
    cand_logp, cand = logp.topk(top_k, dim=-1)  # [B, k]
    if steps == 0:  # no lookahead: S(c) = log p(c|x); the caller feeds the chosen token
        chosen = logits.argmax(dim=-1)  # [B] the top candidate, ties broken like greedy
        return chosen, state, None, (cand, cand_logp, cand_logp)
    rows = torch.arange(batch, device=logits.device).repeat_interleave(top_k)  # [B*k]
    fork = state.fork(rows)  # the context's cache, once per candidate
    after = fork.extend(cand.reshape(-1, 1))[:, -1]  # [B*k, V] logits after each candidate
    alive = ~scorer.is_eos(cand.reshape(-1))  # [B*k]
    future, _ = rollout(fork, after, alive, steps, discount, scorer)
    scores = cand_logp + future.view(batch, top_k)  # [B, k]
    best = scores.argmax(-1)  # [B]
    chosen = cand.gather(-1, best[:, None])[:, 0]  # [B]
    keep = torch.arange(batch, device=logits.device) * top_k + best  # [B] fork rows to keep
    fork.select_rows(keep)
    fork.crop(steps - 1)  # forget the rollout tokens: the fork now holds x + chosen
    return chosen, fork, after.index_select(0, keep), (cand, cand_logp, scores)


# ---------------------------------------------------------------------- debug trace
def _trace_records(step: int, rows: list[int], chosen: Tensor, info) -> list[dict]:
    cand, cand_logp, scores = info
    records = []
    for i, row in enumerate(rows):
        finite = scores[i][torch.isfinite(scores[i])]
        records.append({
            "step": step,
            "row": row,
            "candidates": cand[i].tolist(),
            "log_probs": cand_logp[i].tolist(),
            "scores": scores[i].tolist(),
            "chosen": int(chosen[i]),
            "mean_score": float(finite.mean()) if finite.numel() else float("-inf"),
        })
    return records


def format_eis_trace(trace: list[dict], tokenizer=None) -> str:
    """A readable table per step and row: candidates, log p(c|x), S(c), the chosen one (*)."""
    lines = []
    for rec in trace:
        lines.append(f"step {rec['step']}  row {rec['row']}  mean S = {rec['mean_score']:.4f}")
        lines.append(f"    {'candidate':<20} {'log p(c|x)':>11} {'S(c)':>11}")
        for tok, lp, score in zip(rec["candidates"], rec["log_probs"], rec["scores"], strict=True):
            text = repr(tokenizer.decode([tok])) if tokenizer is not None else str(tok)
            mark = "*" if tok == rec["chosen"] else " "
            lines.append(f"  {mark} {text[:20]:<20} {lp:>11.4f} {score:>11.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the strategy
@torch.inference_mode()
def decode(req: DecodeRequest, opts: EisOptions):
    """EIS decoding (see the module docstring). ``top_k``: candidates per step;
    ``temperature``/``top_p`` shape the scoring distribution; ``rollout_mode``: how
    rollout tokens are chosen ("greedy" or "sample", seeded by ``seed``)."""
    temperature, top_p = opts.scoring(vocab_size(req.model))
    if not req.processor.is_greedy:
        raise DecodeKitError("strategy 'eis' takes temperature/top_k/top_p, not a logits_processor")
    scorer = RolloutScorer(temperature, top_p, opts.rollout_mode == "greedy", req.generator, req.eos_token_ids)
    tracker = req.tracker
    state, logits = ModelState.prefill(req.model, req.input_ids, req.attention_mask, use_cache=req.use_cache)
    logits = logits[:, -1]  # [B, V]
    trace: list[dict] = []
    step = 0
    while True:
        chosen, state, logits, info = eis_step(state, logits, opts.top_k, opts.lookahead_steps,
                                               opts.discount_factor, scorer)
        if req.debug:
            trace += _trace_records(step, list(tracker.active), chosen, info)
        finished = tracker.push(chosen[:, None])
        if logits is None:  # no lookahead: feed the chosen token like greedy decoding
            (chosen,) = drop_finished(tracker, finished, [state], chosen)
            if tracker.done:
                break
            logits = state.extend(chosen[:, None])[:, -1]  # [B, V]
        else:
            (logits,) = drop_finished(tracker, finished, [state], logits)
            if tracker.done:
                break
        step += 1
    return tracker.result(debug=trace if req.debug else None)

