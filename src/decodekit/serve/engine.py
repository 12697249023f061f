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

Events (``TokenEvent``, ``DoneEvent``, ``ErrorEvent``: ``serve.events``) go to each request's
``on_event``, called from the engine threads. A request is a ``serve.jobs.Job`` inside the
engine; lanes, their rows and their keys are ``serve.lanes``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from decodekit.api import build_request
from decodekit.serve.events import (
    DoneEvent,
    EngineRequest,
    ErrorEvent,
    Event,
    Handle,
    QueueFull,
    TokenEvent,
)
from decodekit.serve.jobs import BATCHED_STRATEGIES, Cancelled, Job, error_message, run_solo
from decodekit.serve.lanes import (
    JOINABLE,
    MIXED,
    Lane,
    LaneKey,
    LaneSession,
    LaneTracker,
    first_target,
    job_drafter,
    join_groups,
    joined_request,
    lane_key,
    row_drafters,
    skip_adjustment,
)
from decodekit.serve.mixed import RowProcessors
from decodekit.serve.upkeep import HeapTrimmer, drop_gone, trim_padding
from decodekit.strategies.draft_policy import DraftPolicy, batch_bucket, forward_cost_curve
from decodekit.strategies.ngram import PromptLookupOptions
from decodekit.validation import DecodeKitError

__all__ = ["Engine", "EngineRequest", "Handle", "TokenEvent", "DoneEvent", "ErrorEvent", "QueueFull",
           "BATCHED_STRATEGIES"]

log = logging.getLogger(__name__)

ENGINE_PARAMS = ("tokenizer", "streamer", "debug", "use_cache", "input_ids", "attention_mask")
RATE_WINDOW_S = 10.0  # tokens_per_s: tokens emitted over the last this many seconds


class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1:
            raise DecodeKitError("max_batch_size and max_queue must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()  # batched requests waiting to join a lane
        self._solo: queue.Queue[Job | None] = queue.Queue()
        self._lanes: dict[LaneKey, Lane] = {}
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
        job = Job(req, on_event, self._build(req), self)
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
        trim_heap = HeapTrimmer()
        with torch.inference_mode():
            self._warm_up()
            while not self._stopping.is_set():
                trim_heap()
                for jobs in join_groups(self._admissions()):
                    self._join(jobs)
                if not self._lanes:
                    with self._cond:
                        if not self._pending and not self._stopping.is_set():
                            self._cond.wait(0.5)
                    continue
                for key in list(self._lanes):  # round robin: one step per lane
                    self._step_lane(key)

    def _admissions(self) -> list[Job]:
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
                joinable = lane.joinable if lane is not None else key.prefilled_together
                busy = key in rows and (not joinable or rows[key] + n > self.max_batch_size)
                if busy:
                    waiting.append(job)
                    continue
                rows[key] = rows.get(key, 0) + n
                out.append(job)
            self._pending = waiting
        return out

    def _lane_for(self, job: Job, rows: dict[LaneKey, int], n: int) -> LaneKey:
        """``job``'s lane key. Greedy and unseeded sample rows never draft, so they join any
        mixed lane (whatever its draft-length options) that has room for their ``n`` rows."""
        key = lane_key(job)
        if job.strategy.name not in ("greedy", "sample") or not key.prefilled_together:
            return key
        for other, count in rows.items():
            lane = self._lanes.get(other)
            fits = count + n <= self.max_batch_size and (lane is None or lane.joinable)
            if other.prefilled_together and other.first_target == key.first_target and fits:
                return other
        return key

    def _join(self, jobs: list[Job]) -> None:
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
            first.fail(error_message(exc), "invalid_request" if isinstance(exc, DecodeKitError) else "decode_error")
            return
        if run is None:  # every row finished at its first token
            return
        if lane is None:
            joinable = type(run.drafter) in JOINABLE
            self._lanes[key] = Lane(run, first_target(first), skip_adjustment(first), joinable,
                                     draft_model)
            return
        try:
            lane.run.add_rows(run)
        except Exception as exc:
            log.exception("merging requests into their lane failed")
            self._fail_lane(key, error_message(exc))
            for job in jobs:
                job.fail(error_message(exc))

    def _begin(self, jobs: list[Job], lane: Lane | None) -> tuple[LaneSession | None, object]:
        """A run of ``jobs``' rows: target prefilled in one batch, first token emitted (``_begin``)."""
        parts = []
        for job in jobs:
            job.tracker.t0 = time.perf_counter()
            parts.append(LaneTracker(job, [next(self._ids) for _ in job.tracker.tokens]))
        tracker = parts[0]
        for part in parts[1:]:
            tracker.add(part)
        req = joined_request([job.dreq for job in jobs], tracker)
        req.prompts = dict(zip(tracker.active, req.prompt_rows(), strict=True))
        job = jobs[0]
        if job.strategy.name in MIXED:  # per-row processors and drafters (serve.mixed)
            policy = job.key.draft_policy()  # the lane's (a greedy row may join a lane of other options)
            drafter = row_drafters(jobs, req, policy)
            req.processor = RowProcessors([j.dreq.processor for j in jobs for _ in j.tracker.tokens])
        else:
            drafter = job_drafter(job, req, lane)
            policy = job.opts.policy() if hasattr(job.opts, "policy") else DraftPolicy(gamma=0)
            policy.check(drafter)
        run = LaneSession(req, drafter, policy)
        run.begin(first_target(job))
        self._count_forwards(run.state.forwards)
        if req.tracker.done:
            return None, None
        return run, getattr(drafter, "model", None)

    def _step_lane(self, key: LaneKey) -> None:
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
            self._fail_lane(key, error_message(exc))
            return
        if run.req.tracker.done:
            del self._lanes[key]

    def _fail_lane(self, key: LaneKey, message: str) -> None:
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
                run_solo(job, self.model, self.tokenizer, self._stopping, self._count_forwards)
            except Cancelled:  # its client went away, or the engine is stopping
                job.fail(*self._stop_reason) if not job.cancelled else job.close()
            except Exception as exc:
                log.exception("request failed")
                job.fail(error_message(exc))
