"""The drafter interface every speculative strategy implements: a ``Draft`` (what a drafter
proposes for the active rows) and the ``Drafter`` base class, with the two helpers most
drafters share (``draw_draft``, ``chain_draft``). It imports nothing else of decodekit at run
time, so drafters (``drafters.py``, ``ngram.py``, ``eagle.py``, ``hybrid.py``, ``forced.py``)
and the loop (``session.py``) can all build on it without a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from decodekit.cache import ModelState
    from decodekit.strategies.base import DecodeRequest
    from decodekit.strategies.verify import VerifyResult

__all__ = ["Draft", "Drafter", "draw_draft", "chain_draft", "maybe_compact", "HOLES_PER_ROW_BEFORE_COMPACT"]

HOLES_PER_ROW_BEFORE_COMPACT = 16  # masked columns per row tolerated before compact()


@dataclass
class Draft:
    """What a drafter proposes for the active rows."""

    tokens: Tensor  # [B, k] drafted ids (anything past drafted[b] is ignored)
    drafted: Tensor  # [B] real drafts per row, 0..k
    q: Tensor | None = None  # [B, k, V] drafter probabilities (processed like p); None = deterministic
    evidence: list[int] | None = None  # per row: strength of the evidence (n-gram order...); None = one level

    @classmethod
    def empty(cls, batch: int, device=None) -> Draft:
        return cls(torch.zeros(batch, 0, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def k(self) -> int:
        return self.tokens.shape[1]


class Drafter:
    """Base class of every drafter (no-op defaults).

    ``rows[i]`` is the full history of active row ``i``: prompt + generated tokens,
    including the latest target token (which the target has not consumed yet).
    """

    name = "drafter"
    state: ModelState | None = None  # the drafter's own model state, if it runs a model
    # kept with the drafter's weights across generate calls (None: none): the cost policy's
    # acceptance estimate lives here, so each call does not re-learn it from the prior
    memory: dict | None = None

    def prefill(self, req: DecodeRequest) -> None:
        """Called once, before the loop, with the whole batch."""

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        """Up to ``k`` draft tokens per row."""
        return Draft.empty(len(rows))

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        """After each verify step; ``p [B, k+1, V]`` are the target's probabilities."""

    def select_rows(self, index: Tensor) -> None:
        """Finished rows left the batch: keep rows ``index [B']``."""

    def add_rows(self, other: Drafter) -> None:
        """Continuous batching: the rows of ``other`` (a drafter of the same kind, prefilled
        for the joining rows) come after this drafter's rows. The base drafter keeps no rows."""
        if type(other) is not type(self) or type(self) is not Drafter:
            raise NotImplementedError(f"drafter {self.name!r} cannot take rows of a running batch")

    def step_cost(self, batch: int) -> float:
        """Seconds one drafting step costs for ``batch`` rows (the cost policy uses it)."""
        return 0.0

    def levels(self, rows: list[list[int]]) -> list[int] | None:
        """Before drafting, per row: the evidence level its next drafts would have
        (``Draft.evidence``; the cost policy keeps an estimate and a budget per level).
        None: one level (every drafter but the hybrid)."""
        return None

    def level_cost(self, level: int, batch: int) -> float:
        """Seconds of one drafting step for rows of ``level`` (default: ``step_cost``)."""
        return self.step_cost(batch)

    def setup_cost(self, level: int, batch: int) -> float:
        """Seconds a ``propose`` for rows of ``level`` costs now beyond its drafting steps
        (EAGLE: catching up on the target's features of the tokens accepted since it last
        drafted). Default: none."""
        return 0.0


def draw_draft(req: DecodeRequest, logits: Tensor, rows: list[list[int]] | None) -> tuple[Tensor, Tensor]:
    """Drafter ``logits [B, V]`` -> ``q [B, V]`` (processed like p, with the same history
    ``rows``) and a draft ``[B]`` from it (its argmax when greedy)."""
    proc = req.processor
    q = req.probs(logits, rows)
    return q, (q.argmax(-1) if proc.is_greedy else proc.sample(q, generator=req.generator))


def chain_draft(req: DecodeRequest, rows: list[list[int]], k: int, state: Tensor,
                draw: Callable[[Tensor, list[list[int]] | None], tuple[Tensor, Tensor]],
                feed: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``k >= 1`` drafts, one at a time (a chain): ``draw(state, history)`` -> ``q [B, V]``,
    draft ``[B]``; ``feed(draft [B], state)`` -> the drafter's state after that draft (not
    called after the last). ``state`` is whatever the drafter draws from (logits ``[B, V]``,
    EAGLE's features ``[B, H]``). Returns ``tokens [B, k]`` and ``q [B, k, V]``."""
    history = req.processor.needs_history
    qs, tokens = [], []
    for i in range(k):
        seen = [r + d for r, d in zip(rows, torch.stack(tokens, 1).tolist())] if history and i else rows
        q, x = draw(state, seen if history else None)  # [B, V], [B]
        qs.append(q)
        tokens.append(x)
        if i < k - 1:
            state = feed(x, state)
    return torch.stack(tokens, 1), torch.stack(qs, 1)


def maybe_compact(state: ModelState) -> None:
    """Remove holes when they pile up (or at once for sliding-window models)."""
    state.compact_holes(HOLES_PER_ROW_BEFORE_COMPACT)
