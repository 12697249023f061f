"""What a generation returns, and the bookkeeping every strategy shares.

``RowTracker`` is the single place that turns "these new tokens for these rows" into
finished sequences: it cuts at the first EOS, at ``max_new_tokens`` and at stop strings,
streams tokens, counts forwards and speculation statistics per request, and tells the
strategy which rows finished so it can drop them from its batch.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

__all__ = ["RequestStats", "GenerationOutput", "RowTracker"]


@dataclass
class RequestStats:
    """Per-request metrics. Speculative fields stay 0 for strategies that do not draft."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    forward_passes: int = 0  # target-model forwards this request took part in (prefill included)
    seconds: float = 0.0  # from the start of the call to this request's last token
    first_token_seconds: float = 0.0  # from the start of the call to its first token (prefill included)
    finish_reason: str = "length"  # "eos" | "length" | "stop_string"
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted by the target
    drafter_forwards: int = 0
    accept_lengths: list[int] = field(default_factory=list)  # accepted drafts per verify step
    draft_lengths: list[int] = field(default_factory=list)  # drafts proposed per verify step
    mask_seconds: float = 0.0  # structured output: time computing the grammar's token masks
    forced_tokens: int = 0  # structured output: tokens the grammar forced (the one it allowed)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second after it: the decode rate without the prefill
        (0.0 with fewer than two tokens)."""
        seconds = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / seconds if self.new_tokens > 1 and seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step (accepted drafts + the recovered/bonus token)."""
        steps = len(self.accept_lengths)
        return (self.accepted + steps) / steps if steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def acceptance_histogram(self) -> dict[int, int]:
        """Number of verify steps that accepted exactly ``j`` drafts, for each ``j``."""
        return dict(sorted(Counter(self.accept_lengths).items()))

    @property
    def position_acceptance(self) -> list[float]:
        """For draft position ``i`` (0-based): P(accepted | position i was drafted)."""
        if not self.draft_lengths:
            return []
        width = max(self.draft_lengths)
        drafted = [0] * width
        accepted = [0] * width
        for n_draft, n_acc in zip(self.draft_lengths, self.accept_lengths):
            for i in range(n_draft):
                drafted[i] += 1
                accepted[i] += i < n_acc
        return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("accept_lengths")
        d.pop("draft_lengths")
        d["tokens_per_s"] = round(self.tokens_per_s, 3)
        d["seconds"] = round(self.seconds, 4)
        d["first_token_seconds"] = round(self.first_token_seconds, 4)
        if self.drafted:
            d["acceptance_rate"] = round(self.acceptance_rate, 4)
            d["mean_accepted_length"] = round(self.mean_accepted_length, 4)
            d["acceptance_histogram"] = self.acceptance_histogram
            d["position_acceptance"] = [round(x, 4) for x in self.position_acceptance]
        else:
            for key in ("drafted", "accepted", "drafter_forwards"):
                d.pop(key)
        d["tokens_per_forward"] = round(self.tokens_per_forward, 4)
        if self.mask_seconds or self.forced_tokens:
            d["mask_seconds"] = round(self.mask_seconds, 4)
        else:
            d.pop("mask_seconds")
            d.pop("forced_tokens")
        return d


@dataclass
class GenerationOutput:
    """``sequences[i]``: generated token ids of row ``i`` (prompt excluded)."""

    sequences: list[list[int]]
    stats: list[RequestStats]
    scores: list[float] | None = None  # beam search: final score of each returned sequence
    debug: list | None = None  # strategy-specific trace when debug=True
    # logprobs=N: per row, per generated token {"token_id", "logprob", "top_logprobs": [...]}
    logprobs: list[list[dict]] | None = None

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        return [tokenizer.decode(s, skip_special_tokens=skip_special_tokens) for s in self.sequences]

    @property
    def total_new_tokens(self) -> int:
        return sum(s.new_tokens for s in self.stats)


Streamer = Callable[[int, list[int]], None]


def _as_stream_callback(streamer) -> Streamer | None:
    """Accept ``callback(row, token_ids)`` or a transformers-style streamer (``put``/``end``)."""
    if streamer is None or not hasattr(streamer, "put"):
        return streamer

    def put(row: int, tokens: list[int]) -> None:
        if row == 0:
            streamer.put(torch.tensor([tokens]))

    put.end = streamer.end  # type: ignore[attr-defined]
    return put


class RowTracker:
    """Per-row results of one batched generation (rows are the caller's rows).

    ``active`` lists the caller's row numbers still decoding, in the order of the
    strategy's current batch; ``push`` takes new tokens in that order.
    """

    def __init__(
        self,
        prompt_lengths: Sequence[int],
        *,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] | None = None,
        tokenizer=None,
        streamer=None,
    ):
        self.max_new_tokens = max_new_tokens
        self.eos = set(eos_token_ids)
        self.stop_strings = list(stop_strings or [])
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer to decode text")
        self.tokenizer = tokenizer
        self.stream = _as_stream_callback(streamer)
        self.tokens: list[list[int]] = [[] for _ in prompt_lengths]
        self.logprobs_n: int | None = None  # set by generate(logprobs=N)
        self.logprobs: list[list[dict]] = [[] for _ in prompt_lengths]
        self.stats = [RequestStats(prompt_tokens=int(n)) for n in prompt_lengths]
        self.active: list[int] = list(range(len(prompt_lengths)))
        self.t0 = time.perf_counter()

    @property
    def done(self) -> bool:
        return not self.active

    def count_forwards(self, state, *, drafter: bool = False, rows: Sequence[int] | None = None) -> None:
        """Credit the model calls ``state`` (a ``ModelState``, the one counter of forwards)
        made since it was last read to all active rows (or the given batch positions).
        Strategies read it before rows leave the batch, so every row counts exactly the
        forwards it took part in."""
        n = state.take_forwards()
        if not n:
            return
        positions = range(len(self.active)) if rows is None else rows
        for i in positions:
            stat = self.stats[self.active[i]]
            if drafter:
                stat.drafter_forwards += n
            else:
                stat.forward_passes += n

    def record_verify(self, drafted: Sequence[int], accepted: Sequence[int]) -> None:
        """One verify step: per active row, drafts proposed and drafts accepted."""
        for i, row in enumerate(self.active):
            stat = self.stats[row]
            stat.drafted += int(drafted[i])
            stat.accepted += int(accepted[i])
            stat.draft_lengths.append(int(drafted[i]))
            stat.accept_lengths.append(int(accepted[i]))

    def push(self, new_tokens: Sequence[Sequence[int]] | Tensor, scores: Tensor | None = None) -> list[bool]:
        """Append tokens to the active rows; returns, per active row, whether it finished.

        ``scores [B, K, V]``: the processed scores each token was chosen from (token ``j`` of
        row ``i`` from ``scores[i, j]``), recorded as log-probabilities when ``logprobs_n``."""
        if isinstance(new_tokens, Tensor):
            new_tokens = new_tokens.reshape(len(self.active), -1).tolist()
        now = time.perf_counter() - self.t0
        finished = []
        for i, row in enumerate(self.active):
            kept = self._append(row, new_tokens[i])
            if self.logprobs_n is not None and kept:
                self.logprobs[row] += logprob_entries(scores[i, : len(kept)], kept, self.logprobs_n)
            if kept and self.stats[row].new_tokens == len(kept):  # the row's first tokens
                self.stats[row].first_token_seconds = now
            self.stats[row].seconds = now
            if kept and self.stream is not None:
                self.stream(row, kept)
            finished.append(self.stats[row].finish_reason != "running")
        return finished

    def _append(self, row: int, tokens: Sequence[int]) -> list[int]:
        out, stat = self.tokens[row], self.stats[row]
        stat.finish_reason = "running"
        kept: list[int] = []
        for tok in tokens:
            tok = int(tok)
            out.append(tok)
            kept.append(tok)
            if tok in self.eos:
                stat.finish_reason = "eos"
            elif self.stop_strings and self._hit_stop_string(out):
                stat.finish_reason = "stop_string"
            elif len(out) >= self.max_new_tokens:
                stat.finish_reason = "length"
            if stat.finish_reason != "running":
                break
        stat.new_tokens = len(out)
        return kept

    def hits_stop_string(self, tokens: list[int]) -> bool:
        """Does one of the stop strings appear at the end of the text of ``tokens``? (False if none.)"""
        return bool(self.stop_strings) and self._hit_stop_string(tokens)

    def _hit_stop_string(self, out: list[int]) -> bool:
        longest = max(len(s) for s in self.stop_strings)
        tail = self.tokenizer.decode(out[-(longest + 8) :], skip_special_tokens=False)
        return any(s in tail for s in self.stop_strings)

    def drop_finished(self, finished: Sequence[bool]) -> Tensor | None:
        """Forget finished rows; returns the batch positions to keep (None if all stay)."""
        if not any(finished):
            return None
        keep = [i for i, f in enumerate(finished) if not f]
        self.active = [self.active[i] for i in keep]
        return torch.tensor(keep, dtype=torch.long)

    def result(self, **extra) -> GenerationOutput:
        for stat in self.stats:
            if stat.finish_reason == "running":
                stat.finish_reason = "length"
        if self.stream is not None and hasattr(self.stream, "end"):
            self.stream.end()
        if self.logprobs_n is not None:
            extra.setdefault("logprobs", self.logprobs)
        return GenerationOutput(sequences=self.tokens, stats=self.stats, **extra)


def logprob_entries(scores: Tensor, tokens: Sequence[int], top: int) -> list[dict]:
    """``scores [K, V]`` (processed logits) of ``K`` chosen ``tokens`` -> OpenAI-style entries:
    the token's log-probability under the final distribution and the ``top`` most likely
    (alternatives of probability 0, which a filter or a constraint removed, are left out:
    -inf is not JSON)."""
    logp = torch.log_softmax(scores.float(), dim=-1)  # [K, V]
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    best_lp, best_id = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
    return [
        {"token_id": tok, "logprob": lp,
         "top_logprobs": [{"token_id": t, "logprob": v} for t, v in zip(ids, lps) if v != -math.inf]}
        for tok, lp, ids, lps in zip(tokens, chosen, best_id.tolist(), best_lp.tolist())
    ]
