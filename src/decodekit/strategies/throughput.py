"""The one throughput estimator of the draft-length policies (``cost`` and ``adaptive``).

A verify step in which row ``b`` sends ``n_b`` drafts, each accepted independently with
probability ``a_b``, emits ``E(n_b, a_b)`` tokens for that row (``expected_tokens``); the step
costs ``seconds(width)`` for the batch, ``width`` the longest row's drafts (every row is fed
that many columns). Both policies pick the width that maximises the batch's expected tokens
per second (``best_width``), ``0`` (a plain decoding step) included; they differ in what
they feed it: ``cost`` one acceptance per evidence level and the drafter's cost per draft
step, ``adaptive`` per-row acceptances for drafts already made (free n-gram drafts).
The acceptance itself is ``Acceptance``, with each policy's measured constants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["Acceptance", "expected_tokens", "batch_speed", "best_width", "COST_ESTIMATE", "ADAPTIVE_ESTIMATE"]


def expected_tokens(k: int, a: float) -> float:
    """Expected tokens emitted by one verify step with ``k`` drafts, each accepted
    independently with probability ``a``: ``1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)``."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class Acceptance:
    """The one estimate of the per-token acceptance ``a`` (``cost`` and ``adaptive`` use it).

    ``a`` is the maximum-likelihood estimate for a truncated geometric, ``accepted /
    (accepted + rejections)``, where a rejection is a step that accepted fewer drafts than
    it drafted. The counts forget exponentially (``decay`` per update) so the estimate
    follows the text. A prior of ``prior = (accepted, rejected)`` pseudo-counts is added:
    ``fixed_prior=True`` keeps it forever (after a stretch without drafting the estimate
    drifts back to the prior and the policy probes again: ``cost``), otherwise it starts the
    counts and forgets like an observation (``adaptive``: per row and evidence level, where
    stale levels should stay quiet). A step without drafts forgets by ``idle_decay`` (``idle``):
    slower than an observation, so a drafter that keeps failing is probed again only every
    ~100 steps, not every ~15 (each probe costs a multi-token forward and the drafter's steps).
    Each policy's constants are the ones it was measured with (``COST_ESTIMATE``,
    ``ADAPTIVE_ESTIMATE``).
    """

    def __init__(self, decay: float, prior: tuple[float, float], fixed_prior: bool, idle_decay: float = 1.0):
        self.decay, self.fixed_prior, self.idle_decay = decay, fixed_prior, idle_decay
        self.prior = prior if fixed_prior else (0.0, 0.0)
        self.accepted, self.rejected = (0.0, 0.0) if fixed_prior else prior  # decayed observations

    def add(self, accepted: float, rejected: float) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + rejected

    def idle(self) -> None:
        """A step that drafted nothing: no evidence, the counts fade slowly toward the prior."""
        self.accepted *= self.idle_decay
        self.rejected *= self.idle_decay

    @property
    def rate(self) -> float:
        accepted, rejected = self.accepted + self.prior[0], self.rejected + self.prior[1]
        return accepted / max(accepted + rejected, 1e-9)


# decay, prior (accepted, rejected), fixed prior: as measured for each policy (README, bench)
COST_ESTIMATE = dict(decay=0.95, prior=(2.0, 1.0), fixed_prior=True, idle_decay=0.99)  # a = 2/3, probes again
ADAPTIVE_ESTIMATE = dict(decay=0.8, prior=(1.0, 1.0), fixed_prior=False)  # a = 1/2 at first


def batch_speed(width: int, available: list[int], rates: list[float], seconds: Callable[[int], float]) -> float:
    """Expected tokens of the batch per second when row ``b`` sends ``min(available[b], width)``
    drafts at acceptance ``rates[b]`` and the step costs ``seconds(width)``."""
    tokens = sum(expected_tokens(min(n, width), a) for n, a in zip(available, rates, strict=True))
    return tokens / max(seconds(width), 1e-9)


def best_width(widths: Iterable[int], available: list[int], rates: list[float],
               seconds: Callable[[int], float]) -> int:
    """The width (drafts per row at most) of ``widths`` with the most expected tokens per second
    (the first of equals, so list ``0`` first to prefer plain decoding on a tie)."""
    return max(widths, key=lambda width: batch_speed(width, available, rates, seconds))
