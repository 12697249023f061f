"""The serving engine: one background thread decodes every request, continuously batched.

A request (``EngineRequest``: prompt ids + ``decodekit.generate``'s keyword arguments) is
validated by ``check`` exactly as ``generate`` validates (``api.build_request``), then queued.

* **Lanes.** Requests that can share a batch share a *lane*: one running
  ``DecodeSession`` (``strategies/session.py``), the loop every speculative strategy uses,
  stepped with ``session.step()`` (greedy and sample are the same loop with a drafter that never
  drafts). Strategies greedy, sample, prompt_lookup and ngram share one *mixed* lane
  (``serve.mixed``: each row keeps its own processor and drafter) when their draft-length
  options agree (greedy and sample rows take the drafting strategies' defaults);
  ``speculative`` requests share a lane with the same options and knobs. Per-row settings
  (``max_new_tokens``, ``stop_strings``, ``logprobs``, ``num_return_sequences``) may
  differ inside a lane. The engine thread steps each lane in
  turn (round robin); between steps queued requests join: each is prefilled on its own
  (``session.begin()``) and merged into its lane (``DecodeSession.add_rows``: target cache,
  drafter and draft-length policy rows); finished and cancelled rows leave.
* **Sampling with a seed** runs in a lane of its own (its ``torch.Generator`` is then drawn
  only for its rows, so the output never depends on batch neighbours). Unseeded sampling
  rows share their lane's random stream.
* **Solo strategies** (beam, eis, refine, jacobi) decode one request at a time through
  ``decodekit.generate`` on a second thread, and say ``batched: False`` in their stats (beam's
  final beams and EIS's candidate tables included).

Events (``TokenEvent``, ``DoneEvent``, ``ErrorEvent``) go to each request's ``on_event``, called
from the engine threads. Token kinds: ``plain`` (a target token with nothing drafted),
``accepted`` (a draft the target accepted), ``corrected`` (the target's token after a
rejection), ``bonus`` (the target's token after every draft was accepted).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from decodekit.api import build_request, generate
from decodekit.cache import left_pad
from decodekit.constraints import constraint_stats
from decodekit.outputs import RowTracker, logprob_entries
from decodekit.serve.mixed import RowDrafters, RowProcessors
from decodekit.serve.upkeep import drop_gone, trim_padding
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.draft_policy import (
    DraftPolicy,
    batch_bucket,
    forward_cost_curve,
    make_policy,
)
from decodekit.strategies.drafters import ModelDrafter
from decodekit.strategies.drafting import Drafter
from decodekit.strategies.ngram import NgramDrafter, PromptLookupDrafter, PromptLookupOptions
from decodekit.strategies.session import DecodeSession
from decodekit.validation import DecodeKitError

__all__ = ["Engine", "EngineRequest", "Handle", "TokenEvent", "DoneEvent", "ErrorEvent", "QueueFull",
           "BATCHED_STRATEGIES"]

log = logging.getLogger(__name__)

BATCHED_STRATEGIES = ("greedy", "sample", "prompt_lookup", "ngram", "speculative")
KINDS = {"target": "plain", "draft": "accepted", "recovered": "corrected", "bonus": "bonus"}
ROW_PARAMS = ("max_new_tokens", "stop_strings", "logprobs", "num_return_sequences", "show_drafts")
ENGINE_PARAMS = ("tokenizer", "streamer", "debug", "use_cache", "input_ids", "attention_mask")
JOINABLE = (Drafter, ModelDrafter, NgramDrafter, PromptLookupDrafter, RowDrafters)  # drafters that take rows
MIXED = ("greedy", "sample", "prompt_lookup", "ngram")  # strategies that share one lane (serve.mixed)
POLICY_FIELDS = ("draft_policy", "gamma", "gamma_min", "gamma_max", "egag_ema_beta")
MIXED_KEY_LENGTH = 2 + len(POLICY_FIELDS)  # ("mixed", *policy options, first_target); seeded keys are longer
RATE_WINDOW_S = 10.0  # tokens_per_s: tokens emitted over the last this many seconds


# ---------------------------------------------------------------------------- interface
@dataclass
class EngineRequest:
    prompt_ids: list[int]  # already tokenized (chat template applied by the caller)
    params: dict = field(default_factory=dict)  # decodekit.generate's keyword arguments


@dataclass
class TokenEvent:
    index: int  # choice (row of the request)
    token_ids: list[int]
    kinds: list[str]  # "plain" | "accepted" | "corrected" | "bonus"
    logprobs: list[float] | None
    top_logprobs: list[list[dict]] | None


@dataclass
class DoneEvent:
    index: int
    finish_reason: str  # "stop" | "length"
    stats: dict


@dataclass
class ErrorEvent:
    message: str
    code: str = "decode_error"  # | "invalid_request" (it could not start) | "engine_stopped" | Engine.stop's


Event = TokenEvent | DoneEvent | ErrorEvent


class QueueFull(Exception):
    """``max_queue`` requests are already waiting."""


class Handle:
    """What ``submit`` returns: ``cancel()`` when the client went away."""

    def __init__(self, job: _Job):
        self._job = job

    def cancel(self) -> None:
        self._job.cancelled = True


# ---------------------------------------------------------------------------- one request
class _Job:
    """A submitted request: its validated ``DecodeRequest`` and where its events go."""

    def __init__(self, request: EngineRequest, on_event: Callable, built, engine: Engine):
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


# ---------------------------------------------------------------------------- a lane's rows
class _LaneTracker:
    """``RowTracker``'s interface over the rows of several requests (each keeps its own
    ``RowTracker``, which cuts its rows at EOS / max_new_tokens / stop strings). Rows are
    named by engine-wide ids; ``tokens`` and ``stats`` are the requests' own lists."""

    def __init__(self, job: _Job, ids: list[int]):
        self.active: list[int] = list(ids)
        self.owner = {gid: (job, local) for local, gid in enumerate(ids)}
        self.tokens = {gid: job.tracker.tokens[local] for local, gid in enumerate(ids)}
        self.stats = {gid: job.tracker.stats[local] for local, gid in enumerate(ids)}
        self.logprobs_n = None  # scores are always handed to push; each request decides

    @property
    def done(self) -> bool:
        return not self.active

    def add(self, other: _LaneTracker) -> None:
        self.active += other.active
        self.owner.update(other.owner)
        self.tokens.update(other.tokens)
        self.stats.update(other.stats)

    def _groups(self) -> list[tuple[_Job, list[int]]]:
        """Active batch positions per request (a request's rows are contiguous, in order)."""
        groups: dict[int, tuple[_Job, list[int]]] = {}
        for i, gid in enumerate(self.active):
            job = self.owner[gid][0]
            groups.setdefault(id(job), (job, []))[1].append(i)
        return list(groups.values())

    def room(self) -> list[int]:
        """Tokens each active row may still emit."""
        return [self.owner[g][0].tracker.max_new_tokens - len(self.tokens[g]) for g in self.active]

    def push(self, new_tokens, scores: Tensor | None = None) -> list[bool]:
        finished = [False] * len(self.active)
        for job, pos in self._groups():
            sub = None if scores is None else scores[pos]
            try:
                done = job.tracker.push([new_tokens[i] for i in pos], sub)
            except Exception as exc:  # its stop strings / detokenizer: that request fails alone
                log.exception("a request's row tracker failed")
                job.fail(_message(exc))
                done = [True] * len(pos)
            for i, f in zip(pos, done, strict=True):
                finished[i] = f
        return finished

    def record_verify(self, drafted, accepted) -> None:
        for job, pos in self._groups():
            job.tracker.record_verify([drafted[i] for i in pos], [accepted[i] for i in pos])

    def count_forwards(self, state, *, drafter: bool = False, rows=None) -> None:
        n = state.take_forwards()
        for gid in self.active:
            if drafter:
                self.stats[gid].drafter_forwards += n
            else:
                self.stats[gid].forward_passes += n

    def drop_finished(self, finished) -> Tensor | None:
        """Rows that finished leave (their requests send ``DoneEvent``); returns the positions kept."""
        if not any(finished):
            return None
        for job, pos in self._groups():
            job.tracker.drop_finished([finished[i] for i in pos])
        for gid, f in zip(self.active, finished, strict=True):
            if f:
                self.tokens.pop(gid)  # the request keeps its own lists; a long-lived lane forgets them
                self.stats.pop(gid)
                job, local = self.owner.pop(gid)
                if not (job.cancelled or job.over):
                    job.finish(local)
        keep = [i for i, f in enumerate(finished) if not f]
        self.active = [self.active[i] for i in keep]
        return torch.tensor(keep, dtype=torch.long)


class _LaneRun(DecodeSession):
    """A ``DecodeSession`` whose rows come from several requests: per-row budgets, token
    events with their kinds and log-probabilities, and rows that join between steps."""

    def __init__(self, req, drafter: Drafter, policy: DraftPolicy):
        super().__init__(req, drafter, policy, trace=False)
        for part in (req.processor, drafter):  # serve.mixed: per-row faults fail their rows only
            if hasattr(part, "on_error"):
                part.on_error = self.fail_rows

    def fail_rows(self, positions: list[int], exc: Exception) -> None:
        """Rows (batch positions) whose processor or drafter raised: their requests fail now
        (no more events) and leave at the lane's next look; the other rows go on."""
        tracker = self.req.tracker
        jobs = {id(job): job for job, _ in (tracker.owner[tracker.active[p]] for p in positions)}
        for job in jobs.values():
            if not job.over:
                log.error("request failed while decoding: %s", _message(exc), exc_info=exc)
                job.fail(_message(exc))

    def remaining(self) -> Tensor:
        return torch.tensor(self.req.tracker.room())

    def emit(self, tokens: list[list[int]], kinds: list[list[str]], scores: Tensor) -> list[bool]:
        tracker = self.req.tracker
        before = [len(tracker.tokens[g]) for g in tracker.active]
        finished = super().emit(tokens, kinds, scores)
        for i, gid in enumerate(tracker.active):
            n = len(tracker.tokens[gid]) - before[i]
            if n:
                job, local = tracker.owner[gid]
                job.tokens(local, tokens[i][:n], [KINDS[k] for k in kinds[i][:n]], scores[i, :n])
        return finished

    def drop_finished(self, finished) -> None:
        super().drop_finished(finished)
        active = set(self.req.tracker.active)  # a long-lived lane forgets the prompts of rows that left
        self.req._prompts = {gid: p for gid, p in self.req._prompts.items() if gid in active}

    def add_rows(self, other: _LaneRun) -> None:
        super().add_rows(other)
        self.req.tracker.add(other.req.tracker)
        self.req._prompts.update(other.req._prompts)

    def jobs(self) -> list[_Job]:
        return list({id(j): j for j, _ in self.req.tracker.owner.values()}.values())


@dataclass
class _Lane:
    run: _LaneRun
    first_target: bool
    skip_sample_adjustment: bool
    joinable: bool
    draft_model: object = None

    @property
    def rows(self) -> int:
        return len(self.run.req.tracker.active)


def _hashable(value):
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    return ("object", id(value))  # a model or a processor object: only the same one shares


def _policy_options(job: _Job) -> PromptLookupOptions:
    """The draft-length options of ``job``'s mixed lane: its own for prompt_lookup / ngram;
    greedy and sample rows draft nothing and join the drafting strategies' default lane."""
    return job.opts if isinstance(job.opts, PromptLookupOptions) else PromptLookupOptions()


def _key_policy(key: tuple) -> DraftPolicy:
    """A fresh draft-length policy from a mixed lane's key."""
    name, gamma, gamma_min, gamma_max, beta = key[1:1 + len(POLICY_FIELDS)]
    return make_policy(name, gamma=gamma, gamma_min=gamma_min, gamma_max=gamma_max, egag_ema_beta=beta)


def _lane_key(job: _Job) -> tuple:
    """Requests with equal keys can share a lane. Mixed strategies: the same draft-length
    options and ``first_target`` (processors and drafters are per row); the others: the same
    strategy, options and knobs."""
    if job.strategy.name in MIXED:
        opts = _policy_options(job)
        key = ("mixed", *(getattr(opts, f) for f in POLICY_FIELDS), getattr(job.opts, "first_target", True))
    else:
        params = {k: v for k, v in job.request.params.items() if k not in ROW_PARAMS}
        params.setdefault("strategy", "greedy")
        key = tuple(sorted((k, _hashable(v)) for k, v in params.items()))
    if job.dreq.generator is not None and not job.dreq.processor.is_greedy:
        key += (("seeded request", id(job)),)  # its generator serves its rows only
    return key


def _prefilled_together(key: tuple) -> bool:
    """Requests of an unseeded mixed lane admitted at once are prefilled in one batch."""
    return key[0] == "mixed" and len(key) == MIXED_KEY_LENGTH


def _join_groups(jobs: list[_Job]) -> list[list[_Job]]:
    """Admitted jobs prefilled together: those of one unseeded mixed lane; the others alone."""
    groups: dict[tuple, list[_Job]] = {}
    out = []
    for job in jobs:
        if _prefilled_together(job.key):
            if job.key not in groups:
                groups[job.key] = []
                out.append(groups[job.key])
            groups[job.key].append(job)
        else:
            out.append([job])
    return out


def _joined_request(reqs: list[DecodeRequest], tracker: _LaneTracker) -> DecodeRequest:
    """One request over the rows of several (their prompts left padded together; copies of
    one prompt, ``num_return_sequences``, stay shared)."""
    first = reqs[0]
    if len(reqs) == 1:
        return replace(first, tracker=tracker)
    ids, mask = left_pad([row for r in reqs for row in r.prompt_rows()], first.pad_token_id)  # [B, T]
    device = first.input_ids.device
    return replace(first, input_ids=ids.to(device), attention_mask=mask.to(device), tracker=tracker,
                   max_new_tokens=max(r.max_new_tokens for r in reqs), shared=_joined_shared(reqs))


def _joined_shared(reqs: list[DecodeRequest]) -> Tensor | None:
    """``shared [B]`` of the joined rows: each request's prompt numbers after the ones before."""
    if all(r.shared is None for r in reqs):
        return None
    parts, offset = [], 0
    for r in reqs:
        own = r.shared.cpu() if r.shared is not None else torch.arange(r.input_ids.shape[0])
        parts.append(own + offset)
        offset += int(own[-1]) + 1
    return torch.cat(parts)


def _drafter_kind(job: _Job) -> tuple:
    """Rows whose drafters are of one kind share a sub-drafter in a mixed lane."""
    name, opts = job.strategy.name, job.opts
    if name == "prompt_lookup":
        return name, opts.ngram_n
    if name == "ngram":
        storage = None if opts.storage is None else id(opts.storage)
        return name, opts.ngram_n, opts.filler_top_k, opts.stop_if_unknown, storage
    return ("none",)


# ---------------------------------------------------------------------------- the engine
class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1:
            raise DecodeKitError("max_batch_size and max_queue must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()  # batched requests waiting to join a lane
        self._solo: queue.Queue[_Job | None] = queue.Queue()
        self._lanes: dict[tuple, _Lane] = {}
        self._ids = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._stop_reason = ("the engine stopped", "engine_stopped")
        self._counts = dict(requests_total=0, requests_running=0, generated_tokens_total=0,
                            forwards_total=0, drafted=0, accepted=0)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) over RATE_WINDOW_S

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Start the engine thread (lanes) and the solo thread (daemons)."""
        if self._threads:
            return
        self._stopping.clear()
        for target, name in ((self._loop, "decodekit-engine"), (self._solo_loop, "decodekit-solo")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, message: str = "the engine stopped", code: str = "engine_stopped") -> None:
        """Stop both threads; requests still queued or running get ``ErrorEvent(message, code)``."""
        self._stop_reason = (message, code)
        self._stopping.set()
        self._solo.put(None)
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []
        for job in [*self._pending, *(j for lane in self._lanes.values() for j in lane.run.jobs())]:
            job.fail(message, code)
        self._pending.clear()
        self._lanes.clear()
        while not self._solo.empty():
            job = self._solo.get_nowait()
            if job is not None:
                job.fail(message, code)

    def check(self, req: EngineRequest) -> None:
        """Validate ``req`` as ``decodekit.generate`` would, without decoding (``DecodeKitError``
        naming the field)."""
        self._build(req)

    def submit(self, req: EngineRequest, on_event: Callable[[Event], None]) -> Handle:
        """Validate and queue ``req``; ``on_event`` is called from the engine's threads."""
        job = _Job(req, on_event, self._build(req), self)
        with self._cond:
            if len(self._pending) + self._solo.qsize() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting")
            self._counts["requests_total"] += 1
            self._counts["requests_running"] += 1
            if job.batched:
                self._pending.append(job)
                self._cond.notify_all()
            else:
                self._solo.put(job)
        return Handle(job)

    def metrics(self) -> dict:
        now = time.perf_counter()
        with self._cond:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            counts = dict(self._counts)
            queued = len(self._pending) + self._solo.qsize()
        return {
            "requests_total": counts["requests_total"],
            "requests_running": counts["requests_running"] - queued,
            "queue_depth": queued,
            "batch_size": sum(lane.rows for lane in list(self._lanes.values())),
            "cache_columns": max((lane.run.state.length for lane in list(self._lanes.values())), default=0),
            "lanes": len(self._lanes),
            "generated_tokens_total": counts["generated_tokens_total"],
            "tokens_per_s": round(recent / RATE_WINDOW_S, 3),
            "acceptance_rate": round(counts["accepted"] / counts["drafted"], 4) if counts["drafted"] else 0.0,
            "forwards_total": counts["forwards_total"],
        }

    # ------------------------------------------------------------------ counters (any thread)
    def count_tokens(self, n: int) -> None:
        with self._cond:
            self._counts["generated_tokens_total"] += n
            self._recent.append((time.perf_counter(), n))

    def count_done(self, stat) -> None:
        with self._cond:
            self._counts["drafted"] += stat.drafted
            self._counts["accepted"] += stat.accepted

    def count_closed(self) -> None:
        with self._cond:
            self._counts["requests_running"] -= 1

    def _count_forwards(self, n: int) -> None:
        with self._cond:
            self._counts["forwards_total"] += n

    # ------------------------------------------------------------------ validation
    def _build(self, req: EngineRequest):
        """``api.build_request`` for one prompt: strategy, options, ``DecodeRequest``."""
        if not isinstance(req.params, dict):
            raise DecodeKitError(f"params must be a dict of generate's keyword arguments, got {type(req.params).__name__}")
        for name in ENGINE_PARAMS:
            if name in req.params:
                raise DecodeKitError(f"{name} is set by the server, not by a request")
        prompt = req.prompt_ids.tolist() if isinstance(req.prompt_ids, Tensor) else req.prompt_ids
        if not isinstance(prompt, list | tuple):
            raise DecodeKitError(f"prompt_ids must be a list of token ids, got {type(prompt).__name__}")
        return build_request(self.model, [list(prompt)], tokenizer=self.tokenizer, **req.params)

    # ------------------------------------------------------------------ the lane loop
    def _warm_up(self) -> None:
        """Measure the forward-cost curves the mixed lanes' draft policy reads, for every batch
        size bucket up to ``max_batch_size``, before the first request (measured on first use
        otherwise: ~5 s for 16 rows of the bundled model on 2 CPU cores, inside some request)."""
        top = PromptLookupOptions().gamma + 1  # the default policy's widest verify forward
        buckets = range(batch_bucket(self.max_batch_size).bit_length())
        start = time.perf_counter()
        try:
            for bucket in (1 << b for b in buckets):
                forward_cost_curve(self.model, top, batch=bucket)
        except Exception:  # never fatal: the policies measure on first use instead
            log.exception("measuring forward costs failed")
            return
        log.info("forward costs measured for batch sizes up to %d in %.1f s", self.max_batch_size,
                 time.perf_counter() - start)

    def _loop(self) -> None:
        with torch.inference_mode():
            self._warm_up()
            while not self._stopping.is_set():
                for jobs in _join_groups(self._admissions()):
                    self._join(jobs)
                if not self._lanes:
                    with self._cond:
                        if not self._pending and not self._stopping.is_set():
                            self._cond.wait(0.5)
                    continue
                for key in list(self._lanes):  # round robin: one step per lane
                    self._step_lane(key)

    def _admissions(self) -> list[_Job]:
        """Queued requests that may join now (their lane has room, or they start one)."""
        out, rows = [], {key: lane.rows for key, lane in self._lanes.items()}
        with self._cond:
            waiting = deque()
            while self._pending:
                job = self._pending.popleft()
                if job.cancelled:
                    job.close()
                    continue
                n = len(job.tracker.tokens)
                key = job.key = self._lane_for(job, rows, n)
                lane = self._lanes.get(key)
                # a lane starting now takes more rows only if mixed (they are prefilled with it)
                joinable = lane.joinable if lane is not None else _prefilled_together(key)
                busy = key in rows and (not joinable or rows[key] + n > self.max_batch_size)
                if busy:
                    waiting.append(job)
                    continue
                rows[key] = rows.get(key, 0) + n
                out.append(job)
            self._pending = waiting
        return out

    def _lane_for(self, job: _Job, rows: dict[tuple, int], n: int) -> tuple:
        """``job``'s lane key. Greedy and unseeded sample rows never draft, so they join any
        mixed lane (whatever its draft-length options) that has room for their ``n`` rows."""
        key = _lane_key(job)
        if job.strategy.name not in ("greedy", "sample") or not _prefilled_together(key):
            return key
        for other, count in rows.items():
            lane = self._lanes.get(other)
            fits = count + n <= self.max_batch_size and (lane is None or lane.joinable)
            if _prefilled_together(other) and other[-1] == key[-1] and fits:
                return other
        return key

    def _join(self, jobs: list[_Job]) -> None:
        """Prefill ``jobs`` (admitted together for one lane) in one batch, then merge them into
        their lane (or start it). If several fail to start together, each is retried alone, so
        only a request that cannot start fails."""
        key, first = jobs[0].key, jobs[0]
        lane = self._lanes.get(key)
        try:
            run, draft_model = self._begin(jobs, lane)
        except Exception as exc:
            if len(jobs) > 1:
                for job in jobs:
                    self._join([job])
                return
            log.exception("request failed to start")
            first.fail(_message(exc), "invalid_request" if isinstance(exc, DecodeKitError) else "decode_error")
            return
        if run is None:  # every row finished at its first token
            return
        if lane is None:
            joinable = type(run.drafter) in JOINABLE
            self._lanes[key] = _Lane(run, self._first_target(first), self._skip_adjustment(first), joinable,
                                     draft_model)
            return
        try:
            lane.run.add_rows(run)
        except Exception as exc:
            log.exception("merging requests into their lane failed")
            self._fail_lane(key, _message(exc))
            for job in jobs:
                job.fail(_message(exc))

    def _begin(self, jobs: list[_Job], lane: _Lane | None) -> tuple[_LaneRun | None, object]:
        """A run of ``jobs``' rows: target prefilled in one batch, first token emitted (``_begin``)."""
        parts = []
        for job in jobs:
            job.tracker.t0 = time.perf_counter()
            parts.append(_LaneTracker(job, [next(self._ids) for _ in job.tracker.tokens]))
        tracker = parts[0]
        for part in parts[1:]:
            tracker.add(part)
        req = _joined_request([job.dreq for job in jobs], tracker)
        req._prompts = dict(zip(tracker.active, req.prompt_rows(), strict=True))
        job = jobs[0]
        if job.strategy.name in MIXED:  # per-row processors and drafters (serve.mixed)
            policy = _key_policy(job.key)  # the lane's (a greedy row may join a lane of other options)
            drafter = self._row_drafters(jobs, req, policy)
            req.processor = RowProcessors([j.dreq.processor for j in jobs for _ in j.tracker.tokens])
        else:
            drafter = self._drafter(job, req, lane)
            policy = job.opts.policy() if hasattr(job.opts, "policy") else DraftPolicy(gamma=0)
            policy.check(drafter)
        run = _LaneRun(req, drafter, policy)
        run.begin(self._first_target(job))
        self._count_forwards(run.state.forwards)
        if req.tracker.done:
            return None, None
        return run, getattr(drafter, "model", None)

    def _row_drafters(self, jobs: list[_Job], req, policy: DraftPolicy) -> RowDrafters:
        """Each job's drafter (checked against the lane's policy), as one ``RowDrafters``."""
        parts = []
        for job in jobs:
            drafter = self._drafter(job, req, None)
            policy.check(drafter)
            parts.append(RowDrafters(_drafter_kind(job), drafter, len(job.tracker.tokens)))
        for part in parts[1:]:
            parts[0].add_rows(part)
        return parts[0]

    def _drafter(self, job: _Job, req, lane: _Lane | None) -> Drafter:
        """A fresh drafter for ``job``'s rows, built by its strategy's ``make_drafter`` (the
        function its ``decode`` uses); a lane's loaded draft model is reused."""
        if lane is not None and lane.draft_model is not None:
            return ModelDrafter(lane.draft_model)
        if job.strategy.make_drafter is not None:
            return job.strategy.make_drafter(req, job.opts)
        return Drafter()  # greedy / sample: nothing drafted, every token is the target's

    @staticmethod
    def _first_target(job: _Job) -> bool:
        return getattr(job.opts, "first_target", True)

    @staticmethod
    def _skip_adjustment(job: _Job) -> bool:
        return getattr(job.opts, "skip_sample_adjustment", False)

    def _step_lane(self, key: tuple) -> None:
        """Cancelled rows leave, then one decoding step of the lane."""
        lane = self._lanes[key]
        run = lane.run
        try:
            drop_gone(run)
            if not run.req.tracker.done:
                before = run.state.forwards
                run.step(lane.skip_sample_adjustment)
                self._count_forwards(run.state.forwards - before)
                drop_gone(run)  # rows that failed in this step leave before anyone joins
                trim_padding(run)
        except Exception as exc:  # the lane's requests fail; other lanes go on
            log.exception("decoding step failed")
            self._fail_lane(key, _message(exc))
            return
        if run.req.tracker.done:
            del self._lanes[key]

    def _fail_lane(self, key: tuple, message: str) -> None:
        lane = self._lanes.pop(key, None)
        if lane is not None:
            for job in lane.run.jobs():
                job.fail(message)

    # ------------------------------------------------------------------ solo strategies
    def _solo_loop(self) -> None:
        while not self._stopping.is_set():
            job = self._solo.get()
            if job is None:
                return
            if job.cancelled:
                job.close()
                continue
            try:
                self._run_solo(job)
            except _Cancelled:  # its client went away, or the engine is stopping
                job.fail(*self._stop_reason) if not job.cancelled else job.close()
            except Exception as exc:
                log.exception("request failed")
                job.fail(_message(exc))

    def _run_solo(self, job: _Job) -> None:
        """One request through ``decodekit.generate`` (its strategy cannot share a batch)."""
        streamed: dict[int, int] = {}
        stream = job.request.params.get("logprobs") is None  # else sent at the end, with them

        def on_tokens(row: int, tokens: list[int]) -> None:
            if job.cancelled or self._stopping.is_set():
                raise _Cancelled
            streamed[row] = streamed.get(row, 0) + len(tokens)
            job.tokens(row, tokens, ["plain"] * len(tokens), None)

        eis = job.strategy.name == "eis"
        out = generate(self.model, [list(job.request.prompt_ids)], tokenizer=self.tokenizer,
                       streamer=on_tokens if stream else None, debug=eis, **job.request.params)
        job.rows_left = len(out.sequences)
        self._count_forwards(out.stats[0].forward_passes)
        extra = {}
        if out.scores is not None:
            extra["beams"] = [{"token_ids": s, "score": c} for s, c in zip(out.sequences, out.scores, strict=True)]
        if eis and out.debug is not None:
            extra["eis_steps"] = out.debug
        for row, seq in enumerate(out.sequences):
            rest = seq[streamed.get(row, 0):]
            if rest:
                entries = out.logprobs[row][-len(rest):] if out.logprobs else None
                self._send_tokens(job, row, rest, entries)
            job.finish(row, out.stats[min(row, len(out.stats) - 1)], extra)

    def _send_tokens(self, job: _Job, row: int, tokens: list[int], entries: list[dict] | None) -> None:
        self.count_tokens(len(tokens))
        logprobs = [e["logprob"] for e in entries] if entries else None
        top = [e["top_logprobs"] for e in entries] if entries else None
        job.send(TokenEvent(row, tokens, ["plain"] * len(tokens), logprobs, top))


class _Cancelled(Exception):
    """Raised from a solo request's streamer when its client went away."""


def _message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, DecodeKitError) else f"{type(exc).__name__}: {exc}"
