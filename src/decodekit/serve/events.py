"""What the serving engine takes and sends: an ``EngineRequest`` (prompt ids + generate's
keyword arguments), per-request events (``TokenEvent``, ``DoneEvent``, ``ErrorEvent``) and a
``Handle`` to cancel it. Token kinds: ``plain`` (a target token with nothing drafted),
``accepted`` (a draft the target accepted), ``corrected`` (the target's token after a
rejection), ``bonus`` (the target's token after every draft was accepted)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EngineRequest", "TokenEvent", "DoneEvent", "ErrorEvent", "Event", "QueueFull", "Handle"]


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

    def __init__(self, job):  # a serve.jobs.Job
        self._job = job

    def cancel(self) -> None:
        self._job.cancelled = True
