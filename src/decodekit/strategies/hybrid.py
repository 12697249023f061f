"""Hybrid drafting: prompt lookup where the text repeats, a draft model everywhere else.

``drafter="X+prompt_lookup"`` (``eagle+prompt_lookup``, ``layers:8+prompt_lookup``, a model
name...) wraps drafter ``X`` and a ``PromptLookupDrafter``. Each step, per row:

* a prompt-lookup match of at least ``min_match`` tokens (the row's latest tokens occurred
  before in its prompt or output) -> the tokens that followed it are the row's drafts;
* otherwise -> drafter ``X``'s drafts (``X`` runs only when some row has no match).

Both sub-drafters stay in sync with the row: prompt lookup indexes the whole history
anyway; ``X`` is told every verify result and keeps only those of its own fed drafts that
agree with what was verified (``ModelDrafter.update``), so a row that drafted from the
prompt catches up on the accepted tokens at ``X``'s next forward (they are pending). The
drafts are verified by the one ``verify()``: lookup rows are deterministic (``q`` one-hot),
``X``'s rows carry its ``q``, so greedy output is token-identical to greedy decoding and
sampled output follows the target.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.drafting import Draft, Drafter
from decodekit.strategies.ngram import PromptLookupDrafter
from decodekit.strategies.verify import VerifyResult

__all__ = ["HybridDrafter", "HYBRID_SUFFIX", "split_hybrid"]

HYBRID_SUFFIX = "+prompt_lookup"


def split_hybrid(spec) -> tuple[object, bool]:
    """``"X+prompt_lookup"`` -> ``("X", True)``; anything else -> ``(spec, False)``."""
    if isinstance(spec, str) and spec.strip().endswith(HYBRID_SUFFIX):
        return spec.strip()[: -len(HYBRID_SUFFIX)], True
    return spec, False


class HybridDrafter(Drafter):
    """Prompt-lookup drafts for rows with a match, ``primary``'s for the others (module docstring).

    ``sources`` counts the drafts proposed by each source (``"prompt_lookup"`` and the
    primary's name), row by row, over the drafter's life.
    """

    min_match = 2  # suffix tokens a lookup match needs (a 1-token match is mostly chance)

    def __init__(self, primary: Drafter, max_ngram: int = 3):
        self.primary, self.lookup = primary, PromptLookupDrafter(max_ngram)
        self.name = f"{primary.name}{HYBRID_SUFFIX}"
        self.memory = primary.memory  # keyed by this drafter's name there
        self.sources = {"prompt_lookup": 0, primary.name: 0}

    @property
    def state(self):  # the drafter forwards counted for the rows are the primary's
        return self.primary.state

    def prefill(self, req: DecodeRequest) -> None:
        self.primary.prefill(req)
        self.lookup.prefill(req)

    def matches(self, rows: list[list[int]], k: int) -> list[list[int] | None]:
        """Per row: the lookup's drafts (a match of ``min_match`` tokens or more), else None."""
        out = []
        for i, history in enumerate(rows):
            length, tokens = self.lookup.candidates(i, history, k)
            out.append(tokens if length >= self.min_match and tokens else None)
        return out

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        found = self.matches(rows, k)
        if all(f is not None for f in found):  # every row copies: the primary does not run
            draft = Draft(*_padded(found, k), evidence=[1] * len(rows))
        else:
            draft = _overlay(self.primary.propose(rows, k), found, k)
        mine = sum(len(f) for f in found if f is not None)
        self.sources["prompt_lookup"] += mine
        self.sources[self.primary.name] += int(draft.drafted.sum()) - mine
        return draft

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        self.primary.update(draft, result, p)
        self.lookup.update(draft, result, p)

    def select_rows(self, index: Tensor) -> None:
        self.primary.select_rows(index)
        self.lookup.select_rows(index)

    def add_rows(self, other: Drafter) -> None:
        if not isinstance(other, HybridDrafter):
            raise NotImplementedError(f"drafter {self.name!r} cannot take rows of drafter {other.name!r}")
        self.primary.add_rows(other.primary)
        self.lookup.add_rows(other.lookup)

    def step_cost(self, batch: int) -> float:
        return self.primary.step_cost(batch)  # at most: lookup costs ~nothing

    def levels(self, rows: list[list[int]]) -> list[int]:
        """Before drafting, per row: 1 if it would copy a lookup match, 0 if the primary would
        draft (the ``cost`` policy keeps an acceptance estimate and a budget per level)."""
        return [int(f is not None) for f in self.matches(rows, 1)]

    def level_cost(self, level: int, batch: int) -> float:
        """One drafting step of a row of ``level``: the primary's, or ~0 for a lookup copy."""
        return 0.0 if level == 1 else self.primary.step_cost(batch)

    def setup_cost(self, level: int, batch: int) -> float:
        """The primary's catch-up (it was not fed while rows copied), nothing for a lookup copy."""
        return 0.0 if level == 1 else self.primary.setup_cost(0, batch)


def _padded(found: list[list[int]], k: int) -> tuple[Tensor, Tensor]:
    """Lookup drafts of every row -> ``tokens [B, k]``, ``drafted [B]``."""
    tokens = torch.zeros(len(found), k, dtype=torch.long)
    for b, f in enumerate(found):
        tokens[b, : len(f)] = torch.tensor(f, dtype=torch.long)
    return tokens, torch.tensor([len(f) for f in found], dtype=torch.long)


def _overlay(draft: Draft, found: list[list[int] | None], k: int) -> Draft:
    """The primary's ``draft`` with the lookup's drafts in the rows that have them: their
    tokens, their count and a one-hot ``q`` (a deterministic draft). Evidence: the lookup's
    rows are level 1, the primary's level 0 (``adaptive`` keeps one estimate per level)."""
    pad = max(k - draft.k, 0)  # a primary that drafted fewer columns: widen to k
    tokens = nn.functional.pad(draft.tokens, (0, pad)).clone()  # [B, k], never the primary's own
    drafted = draft.drafted.clone()
    q = None if draft.q is None else nn.functional.pad(draft.q, (0, 0, 0, pad)).clone()  # [B, k, V]
    for b, f in enumerate(found):
        if f is None:
            continue
        n = len(f)
        row = tokens.new_tensor(f)
        tokens[b, :n] = row
        drafted[b] = n
        if q is not None:
            q[b, :n] = nn.functional.one_hot(row.to(q.device), q.shape[-1]).to(q.dtype)
    return Draft(tokens, drafted, q, evidence=[int(f is not None) for f in found])
