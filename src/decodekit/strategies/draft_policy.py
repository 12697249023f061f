"""Draft-length policies: how many tokens a drafter sends to the target each verify step.

Every policy works with every drafter (draft model, self-speculative, n-grams, prompt
lookup) through one interface, used by the one speculative loop:

* ``check(drafter)`` - before any forward: can this policy work with that drafter?
* ``choose(rows) -> budget [B]`` - before drafting, an upper budget per active row (the
  loop then caps it by each row's remaining tokens: drafts past ``max_new_tokens`` are waste),
* ``trim(draft, rows) -> Draft`` - after drafting: keep a prefix of each row's drafts,
* ``observe(drafted [B], accepted [B])`` - after each verify step.

The policies (``POLICIES``):

* ``fixed``: always ``gamma``.
* ``egag`` (entropy-guided adaptive gamma, SPEC §5): per row, the drafter's distribution for
  the next position at temperature T (no top-k/top-p), ``H = -sum p log(p + 1e-8)``,
  ``H_norm = H / log V``, ``g = int((1 - H_norm) * gamma_max)`` clamped to
  ``[gamma_min, gamma_max]``; with ``beta > 0`` an EMA (``ema = g`` on the first step, then
  ``beta * ema + (1 - beta) * g``, budget ``round(ema)``). A confident drafter drafts long,
  an unsure one short. The drafter forward that produced those probabilities is reused as
  the first draft step (``ModelDrafter.first_logits``), so EGAG costs no extra forward.
  Needs a drafter with probabilities (a draft model).
* ``cost`` (the default of ``decodekit.generate``'s speculative strategy): one ``k`` for the
  batch that maximises expected tokens per second, from the measured cost of a target
  forward of ``B`` rows with ``n`` tokens each on this machine (``VerifyCost``, measured for
  the batch size in use), the drafter's cost and the running acceptance; ``k = 0`` (plain
  greedy) whenever drafting cannot pay (see ``CostPolicy``).
* ``adaptive`` (the default of ``ngram`` / ``prompt_lookup``): per row and per *evidence
  level* of the drafter (``Draft.evidence``: prompt lookup's match length, the n-gram order;
  one level for a draft model) an acceptance estimate; one draft width for the batch that
  maximises the batch's expected tokens per second, possibly 0 (see ``AdaptivePolicy``).

``cost`` and ``adaptive`` share one throughput estimator (``decodekit.strategies.throughput``:
``Acceptance`` for the per-token acceptance, ``best_width`` for the width with the most
expected tokens per second).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from decodekit.costs import CostCurve, VerifyCost, batch_bucket, forward_cost_curve
from decodekit.strategies.options import Options, option
from decodekit.strategies.throughput import (
    ADAPTIVE_ESTIMATE,
    COST_ESTIMATE,
    Acceptance,
    best_width,
    expected_tokens,
)
from decodekit.validation import DecodeKitError, check_choice, check_float, check_int

__all__ = [
    "DraftPolicy",
    "FixedPolicy",
    "EgagPolicy",
    "CostPolicy",
    "AdaptivePolicy",
    "AcceptanceGate",
    "Acceptance",
    "CostCurve",
    "VerifyCost",
    "POLICIES",
    "GAMMA_LIMIT",
    "make_policy",
    "forward_cost_curve",
    "batch_bucket",
    "expected_tokens",
    "egag_gamma",
    "DraftOptions",
]

POLICIES = ("fixed", "egag", "cost", "adaptive")
GAMMA_LIMIT = 128  # drafts per step at most: longer drafts only cost (verification grows linearly)


class DraftPolicy:
    """Base class: a fixed budget of ``gamma`` drafts per row."""

    name = "fixed"
    gamma_min = 0  # the loop never caps a row's budget below this (egag and cost: their gamma_min)

    def __init__(self, gamma: int = 5):
        self.gamma = gamma

    def check(self, drafter) -> None:
        """Before any forward: raise ``DecodeKitError`` if ``drafter`` cannot serve this policy."""

    def start(self, req, drafter) -> None:
        """Once, before the first step (after the drafter's prefill)."""

    def choose(self, rows: list[list[int]]) -> Tensor:
        """Draft budget per active row, ``[B]`` ints >= 0."""
        return torch.full((len(rows),), self.gamma, dtype=torch.long)

    def trim(self, draft, rows: list[list[int]]):
        """After drafting: the drafts to verify (a prefix per row). Default: all of them."""
        return draft

    def observe(self, drafted: Tensor, accepted: Tensor) -> None:
        """After each verify step: drafts proposed and accepted per row, ``[B]``."""

    def select_rows(self, index: Tensor) -> None:
        """Finished rows left the batch: keep rows ``index [B']``."""

    def add_rows(self, other: DraftPolicy) -> None:
        """Continuous batching: the rows of ``other`` (the same policy, started for the joining
        rows) come after ours. Policies with per-row state override this; the rest keep their
        batch-wide state."""
        if type(other) is not type(self):
            raise ValueError(f"draft policy {self.name!r} cannot take rows of policy {other.name!r}")


class FixedPolicy(DraftPolicy):
    """Always ``gamma`` drafts."""


# ---------------------------------------------------------------------------- EGAG
def egag_gamma(logits: Tensor, temperature: float, gamma_min: int, gamma_max: int) -> Tensor:
    """``logits [B, V]`` of the drafter -> entropy-guided budget ``g [B]`` (SPEC §5)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # no top-k/top-p
    entropy = -(probs * torch.log(probs + 1e-8)).sum(-1)  # [B]
    h_norm = entropy / math.log(logits.shape[-1])
    g = ((1.0 - h_norm) * gamma_max).floor().long()  # int() of a value >= 0
    return g.clamp(gamma_min, gamma_max)


class EgagPolicy(DraftPolicy):
    """Entropy-guided adaptive gamma, per row, with an optional EMA (module docstring)."""

    name = "egag"

    def __init__(self, gamma_min: int, gamma_max: int, beta: float):
        super().__init__(gamma_max)
        self.gamma_min, self.gamma_max, self.beta = gamma_min, gamma_max, beta
        self.ema: Tensor | None = None  # [B] float
        self.drafter = None
        self.temperature = 1.0

    def check(self, drafter) -> None:
        if not hasattr(drafter, "first_logits"):
            others = ", ".join(repr(n) for n in POLICIES if n != "egag")
            raise DecodeKitError(
                f"draft_policy must be one of {others} with drafter {drafter.name!r}: 'egag' reads "
                "a draft model's probabilities, which it has none of"
            )

    def start(self, req, drafter) -> None:
        self.drafter = drafter
        self.temperature = float(getattr(req.processor, "temperature", 1.0) or 1.0)

    def choose(self, rows: list[list[int]]) -> Tensor:
        logits = self.drafter.first_logits(rows)  # [B, V], reused as the first draft step
        g = egag_gamma(logits, self.temperature, self.gamma_min, self.gamma_max).cpu()
        if self.beta <= 0:
            return g
        if self.ema is None:
            self.ema = g.float()
        else:  # rows that joined the batch since (NaN) start from their g
            ema = self.beta * self.ema + (1.0 - self.beta) * g.float()
            self.ema = torch.where(self.ema.isnan(), g.float(), ema)
        return torch.round(self.ema).long()

    def select_rows(self, index: Tensor) -> None:
        if self.ema is not None:
            self.ema = self.ema.index_select(0, index.cpu())

    def add_rows(self, other: DraftPolicy) -> None:
        super().add_rows(other)
        if self.ema is None and other.ema is None:
            return
        mine = self.ema if self.ema is not None else torch.full((self.rows_before_ema(),), float("nan"))
        theirs = other.ema if other.ema is not None else torch.full((other.rows_before_ema(),), float("nan"))
        self.ema = torch.cat([mine, theirs])

    def rows_before_ema(self) -> int:
        """Rows of a policy that has not chosen yet (its drafter's batch)."""
        return self.drafter.state.batch_size


class CostPolicy(DraftPolicy):
    """Cost-aware draft length: maximise expected tokens per second.

    The model. One step with ``k`` drafts for a batch of ``B`` rows costs

        T(k) = t_target(k + 1, B) + [k > 0] * t_setup(B) + k * t_draft(B)

    where ``t_target(n, B)`` is the measured time of one target forward of ``B`` rows with
    ``n`` new tokens each (``VerifyCost``: measured for the batch size in use, since a
    forward's cost grows with its tokens faster at batch 4 than at batch 1) and
    ``t_draft(B)`` the drafter's cost of one drafting step (``Drafter.step_cost``: a
    forward of the draft model, ~0 for n-grams), ``t_setup(B)`` what drafting now costs
    beyond its steps (``Drafter.setup_cost``: the EAGLE head feeding the features of the
    tokens accepted since it last drafted).
    If every draft is accepted independently with probability ``a`` (``Acceptance``), the
    step emits ``E(k, a) = (1 - a^(k+1)) / (1 - a)`` tokens per row, so the policy picks

        k* = argmax_{k in {0} + [gamma_min, gamma_max]}  B * E(k, a) / T(k).

    ``k = 0`` (plain decoding, one token per target forward) is always a candidate, so the
    policy stops speculating when speculation cannot pay (a slow or inaccurate drafter).
    The acceptance estimate is kept in the drafter's ``memory`` (with its weights) when it
    has one, so the next call with the same drafter starts from it, not from the prior.

    On a CPU ``t_target(n)`` is nearly flat for small ``n`` (reading the weights dominates)
    and then grows linearly (compute dominates); the knee of that curve and ``a`` decide
    how long drafting pays. The cost curves are measured once per model/dtype/device and
    batch size (about a second each).
    """

    name = "cost"

    def __init__(self, gamma_min: int, gamma_max: int):
        super().__init__(gamma_max)
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.estimate = Acceptance(**COST_ESTIMATE)  # level 0 (a one-source drafter's only one)
        self.levels: dict[int, Acceptance] = {0: self.estimate}
        self.last_levels: list[int] = []
        self.memory: dict | None = None
        self.cost: VerifyCost | None = None  # t_target(n, B)
        self.drafter = None
        self.last_choice: int | None = None

    def start(self, req, drafter) -> None:
        self.drafter = drafter
        self.memory = drafter.memory  # the estimates of this drafter's previous calls (or None)
        if self.memory is not None:
            self.estimate = self.levels[0] = self.memory.setdefault(f"{self.name}:{drafter.name}", self.estimate)
        self.gamma_max = min(self.gamma_max, max(req.max_new_tokens, self.gamma_min))  # longer is waste
        self.cost = VerifyCost(req.model, self.gamma_max + 1)

    def level(self, level: int) -> Acceptance:
        """The estimate of drafts of evidence ``level`` (``Drafter.levels``: the hybrid's lookup
        drafts are level 1, its primary's level 0)."""
        if level not in self.levels:
            fresh = Acceptance(**COST_ESTIMATE)
            key = f"{self.name}:{self.drafter.name}:{level}"
            self.levels[level] = self.memory.setdefault(key, fresh) if self.memory is not None else fresh
        return self.levels[level]

    # the estimate's counts, readable and settable here
    accepted = property(lambda self: self.estimate.accepted,
                        lambda self, v: setattr(self.estimate, "accepted", v))
    rejected = property(lambda self: self.estimate.rejected,
                        lambda self, v: setattr(self.estimate, "rejected", v))

    @property
    def acceptance(self) -> float:
        return self.estimate.rate

    def choose(self, rows: list[list[int]]) -> Tensor:
        """One ``k`` per evidence level the rows would draft from now (one level: one ``k``),
        chosen together: every row waits for the widest verify, so a level's drafts pay only
        if its rows' tokens outweigh what the wider forward costs the whole batch."""
        batch = len(rows)
        levels = self.drafter.levels(rows) or [0] * batch
        present = sorted(set(levels))
        ks = [0, *range(self.gamma_min, self.gamma_max + 1)]
        choices = (dict(zip(present, combo)) for combo in itertools.product(ks, repeat=len(present)))
        best = max(choices, key=lambda k: self.batch_speed(k, levels))  # the first of equals: all 0 first
        self.last_levels = levels
        self.last_choice = max(best.values())
        return torch.tensor([best[lv] for lv in levels], dtype=torch.long)

    def batch_speed(self, k: dict[int, int], levels: list[int]) -> float:
        """Expected tokens per second of the batch when rows of level ``lv`` draft ``k[lv]``:
        one verify forward as wide as the widest, plus each drafting level's setup (a drafter
        catching up) and drafting steps."""
        batch = len(levels)
        tokens = sum(expected_tokens(k[lv], self.level(lv).rate) for lv in levels)
        drafting = sum(self.drafter.setup_cost(lv, batch) + n * self.drafter.level_cost(lv, batch)
                       for lv, n in k.items() if n)
        return tokens / max(self.cost(max(k.values()) + 1, batch) + drafting, 1e-9)

    def observe(self, drafted: Tensor, accepted: Tensor) -> None:
        drafted, accepted = drafted.cpu().tolist(), accepted.cpu().tolist()
        levels = self.last_levels if len(self.last_levels) == len(drafted) else [0] * len(drafted)
        for lv in set(levels) | {0}:
            rows = [(d, a) for d, a, row_level in zip(drafted, accepted, levels) if row_level == lv and d]
            if rows:
                self.level(lv).add(sum(a for _, a in rows), sum(a < d for d, a in rows))
            else:
                self.level(lv).idle()


# ---------------------------------------------------------------------------- adaptive
class AdaptivePolicy(DraftPolicy):
    """Per-row, per-evidence-level draft length from measured acceptance.

    Drafts cost target compute: on a CPU a forward over ``k + 1`` tokens is measurably
    slower than over 1, and more so at batch 4 than at batch 1. For each row and each
    evidence level of the drafter (``Draft.evidence``) an ``Acceptance`` estimate ``a_b`` is
    kept. The verify forward feeds every row as many columns as the longest draft, so after
    drafting the policy picks one width ``K`` for the batch, the one that maximises

        sum_b E(min(n_b, K), a_b) / t(K + 1, B)

    (``n_b``: row ``b``'s drafts; ``t``: the measured ``VerifyCost`` at the batch size in
    use), and row ``b`` sends ``min(n_b, K)`` (within the width a draft costs nothing more).
    ``K = 0`` is a plain decoding step: the policy never drafts where the batch loses against
    greedy by its estimate. At batch 1 this is the ``k`` maximising ``E(k, a) / t(k + 1, 1)``.
    While a row's level is gated off, its would-be first draft is still compared with the
    token the target then emits ("shadow" verification, free), so the gate re-opens when the
    text starts to repeat. Also importable as ``AcceptanceGate`` (its first name).
    """

    name = "adaptive"

    def __init__(self, gamma: int):
        super().__init__(gamma)
        self.rows: list[dict[int, Acceptance]] = []  # per row: level -> estimate
        self.shadow: list[tuple[int, int, int] | None] = []  # (level, first draft, position)
        self.levels: list[int] = []  # per row: level of the drafts sent last step
        self.cost: list[float] = []  # cost[k]: seconds of a forward over k + 1 tokens per row
        self.verify: VerifyCost | None = None  # t(n, B), for cost at the batch size in use
        self.cost_batch = 1  # the batch size ``cost`` is for

    def start(self, req, drafter) -> None:
        top = min(self.gamma, req.max_new_tokens)  # longer drafts are never sent
        batch = req.input_ids.shape[0]
        self.verify = VerifyCost(req.model, top + 1)
        self.cost = [self.verify(k + 1, batch) for k in range(top + 1)]
        self.cost_batch = batch
        self.rows, self.shadow, self.levels = [{} for _ in range(batch)], [None] * batch, [0] * batch

    def estimate(self, row: int, level: int) -> Acceptance:
        return self.rows[row].setdefault(level, Acceptance(**ADAPTIVE_ESTIMATE))

    def budget(self, row: int, level: int, available: int) -> int:
        """Drafts worth sending now (0..available) for a row whose evidence is ``level``."""
        if available == 0:
            return 0
        widths = range(min(available, len(self.cost) - 1) + 1)
        return best_width(widths, [available], [self.estimate(row, level).rate], self.cost.__getitem__)

    def batch_budget(self, levels: list[int], available: list[int]) -> list[int]:
        """Drafts each row sends (``min(available[b], K)``) for the batch's best width ``K``."""
        self.rescale(len(levels))
        rates = [self.estimate(i, level).rate if n else 0.0 for i, (level, n) in enumerate(zip(levels, available))]
        top = min(max(available, default=0), len(self.cost) - 1)
        width = best_width(range(top + 1), available, rates, self.cost.__getitem__)
        return [min(n, width) for n in available]

    def rescale(self, batch: int) -> None:
        """Rows left or joined: ``cost`` for the batch size now in use."""
        if self.verify is not None and batch != self.cost_batch:
            self.cost = [self.verify(k + 1, batch) for k in range(len(self.cost))]
            self.cost_batch = batch

    def trim(self, draft, rows: list[list[int]]):
        levels = draft.evidence if draft.evidence is not None else [0] * len(rows)
        for i, history in enumerate(rows):
            self.check_shadow(i, history)
        available = draft.drafted.tolist()
        sent = self.batch_budget(list(levels), available)
        for i, (level, n, k) in enumerate(zip(levels, available, sent, strict=True)):
            if k == 0 and n:
                self.withhold(i, level, int(draft.tokens[i, 0]), len(rows[i]))
        self.levels = list(levels)
        return replace(draft, drafted=torch.tensor(sent, dtype=torch.long, device=draft.drafted.device))

    def observe(self, drafted: Tensor, accepted: Tensor) -> None:
        for i, (n, a) in enumerate(zip(drafted.tolist(), accepted.tolist(), strict=True)):
            if n:
                self.observe_row(i, self.levels[i], n, a)

    def observe_row(self, row: int, level: int, drafted: int, accepted: int) -> None:
        """One row's verify result for drafts of evidence ``level``."""
        self.estimate(row, level).add(accepted, int(accepted < drafted))

    def check_shadow(self, row: int, history: list[int]) -> None:
        """Score the first draft withheld last step against the token emitted instead."""
        pending = self.shadow[row]
        if pending is None:
            return
        level, token, position = pending
        if position < len(history):
            hit = int(history[position] == token)
            self.estimate(row, level).add(hit, 1 - hit)
        self.shadow[row] = None

    def withhold(self, row: int, level: int, token: int, position: int) -> None:
        self.shadow[row] = (level, token, position)

    def select_rows(self, index: Tensor) -> None:
        keep = index.tolist()
        self.rows = [self.rows[i] for i in keep]
        self.shadow = [self.shadow[i] for i in keep]
        self.levels = [self.levels[i] for i in keep]

    def add_rows(self, other: DraftPolicy) -> None:
        super().add_rows(other)
        self.rows += other.rows
        self.shadow += other.shadow
        self.levels += other.levels
        if len(other.cost) > len(self.cost):  # a longer request may send longer drafts
            self.cost = other.cost


AcceptanceGate = AdaptivePolicy  # its first name (public since the n-gram strategies)


# ---------------------------------------------------------------------------- factory
def make_policy(
    name: str = "fixed",
    *,
    gamma: int = 5,
    gamma_min: int = 1,
    gamma_max: int | None = None,
    egag_ema_beta: float = 0.0,
) -> DraftPolicy:
    """Validate the draft-length options and build the policy (``gamma_max`` None -> gamma).

    ``fixed`` drafts ``gamma``; ``egag`` / ``cost`` / ``adaptive`` choose up to ``gamma_max``
    (``egag`` and ``cost`` at least ``gamma_min``)."""
    check_choice("draft_policy", name, POLICIES)
    _check_gamma("gamma", gamma)
    check_int("gamma_min", gamma_min, min_value=1)
    if gamma_max is not None:
        _check_gamma("gamma_max", gamma_max)
    top = gamma if gamma_max is None else gamma_max
    if gamma_min > top:
        raise DecodeKitError(
            f"gamma_min ({gamma_min}) must be <= gamma_max ({top}"
            f"{', which defaults to gamma' if gamma_max is None else ''})"
        )
    check_float("egag_ema_beta", egag_ema_beta)
    if not 0.0 <= egag_ema_beta < 1.0:
        raise DecodeKitError(f"egag_ema_beta must be in [0, 1), got {egag_ema_beta}")
    if name == "egag":
        return EgagPolicy(gamma_min, top, egag_ema_beta)
    if name == "cost":
        return CostPolicy(gamma_min, top)
    if name == "adaptive":
        return AdaptivePolicy(top)
    return FixedPolicy(gamma)


def _check_gamma(name: str, value) -> None:
    check_int(name, value)
    if not 1 <= value <= GAMMA_LIMIT:
        raise DecodeKitError(f"{name} must be >= 1 and <= {GAMMA_LIMIT} (drafts per step), got {value}")


@dataclass(frozen=True)
class DraftOptions(Options):
    """The draft-length options every drafting strategy shares (validated on construction)."""

    gamma: int = option(5, "draft tokens per verify step (fixed), or the most (egag/cost/adaptive)",
                        int, min=1, max=GAMMA_LIMIT)
    draft_policy: str = option("cost", "how many tokens to draft each step (cost: only as many as pay "
                               "for themselves at this batch size, none where drafting loses to greedy)",
                               str, choices=POLICIES)
    gamma_min: int = option(1, "fewest drafts per step for egag / cost", int, min=1)
    gamma_max: int | None = option(None, "most drafts per step for egag / cost / adaptive (default gamma)",
                                   int, min=1, max=GAMMA_LIMIT, optional=True)
    egag_ema_beta: float = option(0.0, "EGAG: EMA weight of the previous draft length, in [0, 1)",
                                  float, min=0.0)
    num_return_sequences: int = option(1, "samples per prompt (sampling; the prompt is prefilled "
                                       "once and shared)", int, min=1)

    @property
    def samples_per_prompt(self) -> int:
        return self.num_return_sequences

    def validate(self) -> None:
        self.policy()  # the cross-field checks live in make_policy

    def policy(self) -> DraftPolicy:
        """A fresh policy for one ``generate`` call."""
        return make_policy(self.draft_policy, gamma=self.gamma, gamma_min=self.gamma_min,
                           gamma_max=self.gamma_max, egag_ema_beta=self.egag_ema_beta)
