"""Forced drafts: where a constraint allows one token only, that token is a free draft.

``ForcedDrafter(inner, constraint)`` drafts, per row, the run of tokens the grammar forces
next (``GrammarConstraint.forced``: ``{"``, ``name``, ``":"`` of a JSON Schema) and falls
back to ``inner``'s drafts for rows with none. The masked target is one-hot on a forced
token, so the verifier accepts it whatever the temperature: the output is unchanged and a
run of forced tokens costs one forward instead of one each. Prompt lookup wraps its drafter
in it when the request has a constraint (``with_forced_drafts``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from decodekit.constraints import GrammarConstraint
from decodekit.processors import LogitsPipeline
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.drafting import Draft, Drafter
from decodekit.strategies.verify import VerifyResult

__all__ = ["ForcedDrafter", "with_forced_drafts"]


class ForcedDrafter(Drafter):
    """The grammar's forced tokens first, ``inner``'s drafts for the other rows."""

    def __init__(self, inner: Drafter, constraint: GrammarConstraint):
        self.inner, self.constraint = inner, constraint
        self.name, self.memory = inner.name, inner.memory
        self.prompt_lengths: list[int] = []  # per active row: where its generated tokens start
        self.forced = 0  # drafts that came from the grammar

    @property
    def state(self):
        return self.inner.state

    def prefill(self, req: DecodeRequest) -> None:
        self.inner.prefill(req)
        self.prompt_lengths = [req.tracker.stats[r].prompt_tokens for r in req.tracker.active]

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        found = self.constraint.forced([h[n:] for h, n in zip(rows, self.prompt_lengths)], k)
        self.forced += sum(len(f) for f in found)
        if all(found):  # every row is forced: the inner drafter does not run
            return _overlay(Draft.empty(len(rows)), found, k)
        return _overlay(self.inner.propose(rows, k), found, k)

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        self.inner.update(draft, result, p)

    def select_rows(self, index: Tensor) -> None:
        self.inner.select_rows(index)
        self.prompt_lengths = [self.prompt_lengths[i] for i in index.tolist()]

    def step_cost(self, batch: int) -> float:
        return self.inner.step_cost(batch)

    def levels(self, rows: list[list[int]]) -> list[int] | None:
        return self.inner.levels(rows)

    def level_cost(self, level: int, batch: int) -> float:
        return self.inner.level_cost(level, batch)


def _overlay(draft: Draft, found: list[list[int]], k: int) -> Draft:
    """``draft`` with the forced tokens in the rows that have some (a one-hot ``q`` there)."""
    pad = max(k - draft.k, 0)
    tokens = nn.functional.pad(draft.tokens, (0, pad)).clone()  # [B, k]
    drafted = draft.drafted.clone()  # [B]
    q = None if draft.q is None else nn.functional.pad(draft.q, (0, 0, 0, pad)).clone()  # [B, k, V]
    for b, forced in enumerate(found):
        if forced:
            row = torch.tensor(forced, dtype=torch.long)
            tokens[b, : len(forced)], drafted[b] = row, len(forced)
            if q is not None:
                q[b, : len(forced)] = nn.functional.one_hot(row.to(q.device), q.shape[-1]).to(q.dtype)
    return Draft(tokens, drafted, q, evidence=draft.evidence)


def with_forced_drafts(req: DecodeRequest, drafter: Drafter) -> Drafter:
    """``drafter`` wrapped in a ``ForcedDrafter`` when ``req``'s one pipeline starts with a
    constraint (a serving lane's per-row processors keep their drafters as they are)."""
    proc = req.processor
    if isinstance(proc, LogitsPipeline) and proc.processors and isinstance(proc.processors[0], GrammarConstraint):
        return ForcedDrafter(drafter, proc.processors[0])
    return drafter
