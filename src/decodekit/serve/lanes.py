"""A lane: the rows of several requests decoded as one batch (``LaneSession``, a
``DecodeSession``), how its rows map to their requests (``LaneTracker``), and which requests
may share one (``LaneKey``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from decodekit.cache import left_pad
from decodekit.serve.jobs import Job, error_message
from decodekit.serve.mixed import RowDrafters
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.draft_policy import DraftPolicy, make_policy
from decodekit.strategies.drafters import ModelDrafter
from decodekit.strategies.drafting import Drafter
from decodekit.strategies.ngram import NgramDrafter, PromptLookupDrafter, PromptLookupOptions
from decodekit.strategies.session import DecodeSession

__all__ = ["LaneTracker", "LaneSession", "Lane", "LaneKey", "lane_key", "join_groups", "joined_request",
           "drafter_kind", "row_drafters", "job_drafter", "first_target", "skip_adjustment", "MIXED",
           "JOINABLE"]

log = logging.getLogger(__name__)

KINDS = {"target": "plain", "draft": "accepted", "recovered": "corrected", "bonus": "bonus"}
ROW_PARAMS = ("max_new_tokens", "stop_strings", "logprobs", "num_return_sequences", "show_drafts")
JOINABLE = (Drafter, ModelDrafter, NgramDrafter, PromptLookupDrafter, RowDrafters)  # drafters that take rows
MIXED = ("greedy", "sample", "prompt_lookup", "ngram")  # strategies that share one lane (serve.mixed)
POLICY_FIELDS = ("draft_policy", "gamma", "gamma_min", "gamma_max", "egag_ema_beta")


class LaneTracker:
    """``RowTracker``'s interface over the rows of several requests (each keeps its own
    ``RowTracker``, which cuts its rows at EOS / max_new_tokens / stop strings). Rows are
    named by engine-wide ids; ``tokens`` and ``stats`` are the requests' own lists."""

    def __init__(self, job: Job, ids: list[int]):
        self.active: list[int] = list(ids)
        self.owner = {gid: (job, local) for local, gid in enumerate(ids)}
        self.tokens = {gid: job.tracker.tokens[local] for local, gid in enumerate(ids)}
        self.stats = {gid: job.tracker.stats[local] for local, gid in enumerate(ids)}
        self.logprobs_n = None  # scores are always handed to push; each request decides

    @property
    def done(self) -> bool:
        return not self.active

    def add(self, other: LaneTracker) -> None:
        self.active += other.active
        self.owner.update(other.owner)
        self.tokens.update(other.tokens)
        self.stats.update(other.stats)

    def _groups(self) -> list[tuple[Job, list[int]]]:
        """Active batch positions per request (a request's rows are contiguous, in order)."""
        groups: dict[int, tuple[Job, list[int]]] = {}
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
                job.fail(error_message(exc))
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
                if job.cancelled:  # cancelled during this step: nobody listens, but it is over
                    job.close()
                elif not job.over:
                    job.finish(local)
        keep = [i for i, f in enumerate(finished) if not f]
        self.active = [self.active[i] for i in keep]
        return torch.tensor(keep, dtype=torch.long)


class LaneSession(DecodeSession):
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
                log.error("request failed while decoding: %s", error_message(exc), exc_info=exc)
                job.fail(error_message(exc))

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
        self.req.prompts = {gid: p for gid, p in self.req.prompts.items() if gid in active}

    def add_rows(self, other: LaneSession) -> None:
        super().add_rows(other)
        self.req.tracker.add(other.req.tracker)
        self.req.prompts.update(other.req.prompts)

    def jobs(self) -> list[Job]:
        return list({id(j): j for j, _ in self.req.tracker.owner.values()}.values())


@dataclass
class Lane:
    run: LaneSession
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


@dataclass(frozen=True)
class LaneKey:
    """Requests with equal keys share a lane (``lane_key``)."""

    mixed: bool  # greedy / sample / prompt_lookup / ngram rows (serve.mixed: per-row processors, drafters)
    first_target: bool = True
    policy: tuple = ()  # mixed: the draft-length options, (name, value) for each of POLICY_FIELDS
    params: tuple = ()  # the other strategies: every decoding parameter but the per-row ones, sorted
    seeded_request: int | None = None  # a seeded sampling request: its generator serves its rows only

    @property
    def prefilled_together(self) -> bool:
        """Requests of an unseeded mixed lane admitted at once are prefilled in one batch."""
        return self.mixed and self.seeded_request is None

    def draft_policy(self) -> DraftPolicy:
        """A fresh draft-length policy from a mixed lane's options."""
        options = dict(self.policy)
        return make_policy(options.pop("draft_policy"), **options)


def _policy_options(job: Job) -> PromptLookupOptions:
    """The draft-length options of ``job``'s mixed lane: its own for prompt_lookup / ngram;
    greedy and sample rows draft nothing and join the drafting strategies' default lane."""
    return job.opts if isinstance(job.opts, PromptLookupOptions) else PromptLookupOptions()


def lane_key(job: Job) -> LaneKey:
    """Mixed strategies share a lane with the same draft-length options and ``first_target``
    (processors and drafters are per row); the others with the same strategy, options and knobs."""
    seeded = id(job) if job.dreq.generator is not None and not job.dreq.processor.is_greedy else None
    if job.strategy.name in MIXED:
        opts = _policy_options(job)
        return LaneKey(True, getattr(job.opts, "first_target", True),
                       policy=tuple((f, getattr(opts, f)) for f in POLICY_FIELDS), seeded_request=seeded)
    params = {k: v for k, v in job.request.params.items() if k not in ROW_PARAMS}
    params.setdefault("strategy", "greedy")
    return LaneKey(False, params=tuple(sorted((k, _hashable(v)) for k, v in params.items())),
                   seeded_request=seeded)


def join_groups(jobs: list[Job]) -> list[list[Job]]:
    """Admitted jobs prefilled together: those of one unseeded mixed lane; the others alone."""
    groups: dict[LaneKey, list[Job]] = {}
    out = []
    for job in jobs:
        if job.key.prefilled_together:
            if job.key not in groups:
                groups[job.key] = []
                out.append(groups[job.key])
            groups[job.key].append(job)
        else:
            out.append([job])
    return out


def joined_request(reqs: list[DecodeRequest], tracker: LaneTracker) -> DecodeRequest:
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


def drafter_kind(job: Job) -> tuple:
    """Rows whose drafters are of one kind share a sub-drafter in a mixed lane."""
    name, opts = job.strategy.name, job.opts
    if name == "prompt_lookup":
        return name, opts.ngram_n
    if name == "ngram":
        storage = None if opts.storage is None else id(opts.storage)
        return name, opts.ngram_n, opts.filler_top_k, opts.stop_if_unknown, storage
    return ("none",)


# ---------------------------------------------------------------------------- drafters
def row_drafters(jobs: list[Job], req, policy: DraftPolicy) -> RowDrafters:
    """Each job's drafter (checked against the lane's policy), as one ``RowDrafters``."""
    parts = []
    for job in jobs:
        drafter = job_drafter(job, req, None)
        policy.check(drafter)
        parts.append(RowDrafters(drafter_kind(job), drafter, len(job.tracker.tokens)))
    for part in parts[1:]:
        parts[0].add_rows(part)
    return parts[0]


def job_drafter(job: Job, req, lane: Lane | None) -> Drafter:
    """A fresh drafter for ``job``'s rows, built by its strategy's ``make_drafter`` (the
    function its ``decode`` uses); a lane's loaded draft model is reused."""
    if lane is not None and lane.draft_model is not None:
        return ModelDrafter(lane.draft_model)
    if job.strategy.make_drafter is not None:
        return job.strategy.make_drafter(req, job.opts)
    return Drafter()  # greedy / sample: nothing drafted, every token is the target's


def first_target(job: Job) -> bool:
    return getattr(job.opts, "first_target", True)


def skip_adjustment(job: Job) -> bool:
    return getattr(job.opts, "skip_sample_adjustment", False)
