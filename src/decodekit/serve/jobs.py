"""One submitted request inside the engine (``Job``): its validated ``DecodeRequest``, where
its events go, and how its rows finish or fail."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from torch import Tensor

from decodekit.api import generate
from decodekit.constraints import constraint_stats
from decodekit.outputs import RowTracker, logprob_entries
from decodekit.serve.events import DoneEvent, ErrorEvent, Event, TokenEvent
from decodekit.validation import DecodeKitError

__all__ = ["Job", "Cancelled", "error_message", "run_solo", "BATCHED_STRATEGIES"]

log = logging.getLogger(__name__)

BATCHED_STRATEGIES = ("greedy", "sample", "prompt_lookup", "ngram", "speculative")


class Job:
    """A submitted request: its validated ``DecodeRequest`` and where its events go."""

    def __init__(self, request, on_event: Callable, built, engine):
        self.request, self.on_event, self.engine = request, on_event, engine
        self.strategy, self.opts, self.dreq = built
        self.tracker: RowTracker = self.dreq.tracker  # the request's own rows (choices)
        self.rows_left = len(self.tracker.tokens)
        self.cancelled = False
        self.key: tuple | None = None  # its lane (batched strategies)
        self.over = False  # done, failed or cancelled: no more events

    @property
    def batched(self) -> bool:
        return self.strategy.name in BATCHED_STRATEGIES

    def send(self, event: Event) -> None:
        if self.over or self.cancelled:
            return
        try:
            self.on_event(event)
        except Exception:  # a listener's bug never stops the engine
            log.exception("on_event failed")

    def tokens(self, row: int, ids: list[int], kinds: list[str], scores: Tensor | None) -> None:
        logprobs = top = None
        if scores is not None:
            entries = logprob_entries(scores, ids, self.tracker.logprobs_n or 0)
            logprobs = [e["logprob"] for e in entries]
            if self.tracker.logprobs_n is not None:
                top = [e["top_logprobs"] for e in entries]
        self.engine.count_tokens(len(ids))
        self.send(TokenEvent(row, list(ids), kinds, logprobs, top))

    def finish(self, row: int, stat=None, extra: dict | None = None) -> None:
        """Row ``row`` is done: its ``DoneEvent`` (stats from ``stat``, default the row's own)."""
        if stat is None:  # a batched lane's row (generate() fills its own)
            stat = self.tracker.stats[row]
            constraint_stats(self.dreq.processor, [self.tracker.tokens[row]], [stat])
        reason = "length" if stat.finish_reason in ("length", "running") else "stop"
        stats = {"strategy": self.strategy.name, **stat.to_dict(), "forwards": stat.forward_passes,
                 "acceptance_rate": round(stat.acceptance_rate, 4),
                 "mean_accepted_length": round(stat.mean_accepted_length, 4),
                 "batched": self.batched, **(extra or {})}
        self.engine.count_done(stat)
        self.send(DoneEvent(row, reason, stats))
        self.rows_left -= 1
        if self.rows_left <= 0:
            self.close()

    def fail(self, message: str, code: str = "decode_error") -> None:
        self.send(ErrorEvent(message, code))
        self.close()

    def close(self) -> None:
        if not self.over:
            self.over = True
            self.engine.count_closed()


# ---------------------------------------------------------------------------- solo strategies
def run_solo(job: Job, model, tokenizer, stopping: threading.Event, count_forwards: Callable[[int], None]) -> None:
    """One request through ``decodekit.generate`` (its strategy cannot share a batch); raises
    ``Cancelled`` from its streamer when the client went away or ``stopping`` is set."""
    streamed: dict[int, int] = {}
    stream = job.request.params.get("logprobs") is None  # else sent at the end, with them

    def on_tokens(row: int, tokens: list[int]) -> None:
        if job.cancelled or stopping.is_set():
            raise Cancelled
        streamed[row] = streamed.get(row, 0) + len(tokens)
        job.tokens(row, tokens, ["plain"] * len(tokens), None)

    eis = job.strategy.name == "eis"
    out = generate(model, [list(job.request.prompt_ids)], tokenizer=tokenizer,
                   streamer=on_tokens if stream else None, debug=eis, **job.request.params)
    job.rows_left = len(out.sequences)
    count_forwards(out.stats[0].forward_passes)
    extra = {}
    if out.scores is not None:
        extra["beams"] = [{"token_ids": s, "score": c} for s, c in zip(out.sequences, out.scores, strict=True)]
    if eis and out.debug is not None:
        extra["eis_steps"] = out.debug
    for row, seq in enumerate(out.sequences):
        rest = seq[streamed.get(row, 0):]
        if rest:
            entries = out.logprobs[row][-len(rest):] if out.logprobs else None
            _send_tokens(job, row, rest, entries)
        job.finish(row, out.stats[min(row, len(out.stats) - 1)], extra)


def _send_tokens(job: Job, row: int, tokens: list[int], entries: list[dict] | None) -> None:
    job.engine.count_tokens(len(tokens))
    logprobs = [e["logprob"] for e in entries] if entries else None
    top = [e["top_logprobs"] for e in entries] if entries else None
    job.send(TokenEvent(row, tokens, ["plain"] * len(tokens), logprobs, top))


class Cancelled(Exception):
    """Raised from a solo request's streamer when its client went away."""


def error_message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, DecodeKitError) else f"{type(exc).__name__}: {exc}"
