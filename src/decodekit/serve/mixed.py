"""Mixed lanes: rows of different strategies and sampling settings in ONE batch.

The serving engine batches requests of strategies ``greedy``, ``sample``, ``prompt_lookup``
and ``ngram`` together (one lane), whatever their temperature, top-p, penalties or n-gram
options, so 16 clients make one batch of 16 rows instead of four batches of four (on a CPU
one forward of 16 rows costs about 2.4x one of 1 row; four forwards of 4 rows cost 4x).

Two pieces make that exact, row by row:

* ``RowProcessors``: each row's scores and distribution come from its own request's
  processor (``LogitsPipeline``'s interface, applied per group of rows).
* ``RowDrafters``: each row drafts with its own request's drafter (none for greedy and
  sample, prompt lookup, NASD), one sub-drafter per drafter kind holding its rows in lane
  order.

The lane verifies with the shared rejection sampler, told which rows are greedy
(``RowProcessors.greedy_rows``): those accept a draft exactly when it is the argmax and emit
the argmax, the others accept and draw as the sampler does, so a greedy row emits its greedy
tokens whatever its neighbours and only sampled rows pay for a draw over the vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from decodekit.processors import LogitsPipeline
from decodekit.strategies.drafting import Draft, Drafter
from decodekit.strategies.verify import VerifyResult

__all__ = ["RowProcessors", "RowDrafters"]


def _positions(keys: list, key) -> list[int]:
    """Rows (lane order) whose key is ``key``."""
    return [i for i, k in enumerate(keys) if k == key]


def _kept(positions: list[int], keep: set[int]) -> list[int]:
    """Of a group's rows ``positions``, the local indices of the rows in ``keep``."""
    return [j for j, i in enumerate(positions) if i in keep]


# ---------------------------------------------------------------------------- processors
def _group_key(proc: LogitsPipeline):
    """Rows whose processors behave alike are processed in one call: a plain greedy pipeline
    is stateless, anything else is its own group (its object)."""
    return "greedy" if proc.is_greedy and not proc.processors else id(proc)


class RowProcessors:
    """``LogitsPipeline``'s interface over rows that each have their own processor.

    ``procs[b]`` processes row ``b``; ``select_rows`` / ``add_rows`` follow the batch."""

    temperature = None  # per row; only the draft policies read it (egag, never in a mixed lane)

    def __init__(self, procs: list[LogitsPipeline]):
        self.procs = list(procs)
        self._groups: list[tuple[LogitsPipeline, Tensor]] | None = None  # until rows leave or join
        self.on_error = None  # on_error(rows, exc): the rows whose processor raised (else it raises)

    @property
    def is_greedy(self) -> bool:
        return all(p.is_greedy for p in self.procs)

    @property
    def greedy_rows(self) -> Tensor | bool:
        """``[B]`` bool: the rows ``verify`` decodes by argmax (no draw); one bool when all agree."""
        flags = [p.is_greedy for p in self.procs]
        return flags[0] if len(set(flags)) <= 1 and flags else torch.tensor(flags)

    @property
    def needs_history(self) -> bool:
        return any(p.needs_history for p in self.procs)

    @property
    def processors(self) -> list:
        return [step for p in self.procs for step in p.processors]

    def groups(self) -> list[tuple[LogitsPipeline, Tensor]]:
        """``(processor, rows [n])`` per group of rows processed alike (kept between steps)."""
        if self._groups is None:
            keys = [_group_key(p) for p in self.procs]
            first = {}
            for i, key in enumerate(keys):
                first.setdefault(key, i)
            self._groups = [(self.procs[i], torch.tensor(_positions(keys, key))) for key, i in first.items()]
        return self._groups

    def _per_group(self, x: Tensor, fn, fallback) -> Tensor:
        """``fn(proc, rows)`` -> the rows' ``[n, ...]`` float32 result, gathered into ``[B, ...]``;
        ``fallback(rows of x)`` stands in for a group that raised."""
        groups = self.groups()
        if len(groups) == 1 and self.on_error is None:
            return fn(groups[0][0], None)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for proc, rows in groups:
            out[rows.to(x.device)] = self._guarded(lambda p=proc, r=rows: fn(p, r), rows,
                                                   lambda r=rows: fallback(_take(x, r)))
        return out

    def _guarded(self, compute, rows: Tensor, stand_in):
        """``compute()``; if it raises and ``on_error`` is set, the rows fail and ``stand_in()``."""
        try:
            return compute()
        except Exception as exc:
            if self.on_error is None:
                raise
            self.on_error(rows.tolist(), exc)
            return stand_in()

    def process_logits(self, input_ids, logits: Tensor, prompt_lengths=None, pad_lengths=None) -> Tensor:
        """``[B, V]`` or ``[B, K, V]`` logits -> each row's processed float32 logits."""

        def one(proc: LogitsPipeline, rows: Tensor | None) -> Tensor:
            if rows is None:
                return proc.process_logits(input_ids, logits, prompt_lengths, pad_lengths)
            return proc.process_logits(*(_take(t, rows) for t in (input_ids, logits, prompt_lengths, pad_lengths)))

        return self._per_group(logits, one, lambda rows: rows.float())

    def distribution(self, scores: Tensor) -> Tensor:
        return self._per_group(scores, lambda proc, rows: proc.distribution(_take(scores, rows)),
                               lambda rows: torch.softmax(rows.float(), dim=-1))

    def sample(self, probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, V]`` or ``[B, T, V]`` -> ``[B]`` or ``[B, T]`` token ids (groups draw in order)."""
        out = torch.empty(probs.shape[:-1], dtype=torch.long, device=probs.device)
        for proc, rows in self.groups():
            own = probs[rows.to(probs.device)]
            out[rows.to(probs.device)] = self._guarded(lambda p=proc, o=own: p.sample(o, generator=generator),
                                                       rows, lambda o=own: o.argmax(-1))
        return out

    def select_rows(self, keep: list[int]) -> None:
        self.procs = [self.procs[i] for i in keep]
        self._groups = None

    def add_rows(self, other: RowProcessors) -> None:
        self.procs += other.procs
        self._groups = None

    def __repr__(self) -> str:
        return f"RowProcessors({len(self.procs)} rows, {len(self.groups())} groups)"


def _take(t, rows: Tensor | None):
    """Rows ``rows`` of a per-row tensor (None and plain ints pass through)."""
    if rows is None or not isinstance(t, Tensor) or t.dim() == 0:
        return t
    return t.index_select(0, rows.to(t.device))


# ---------------------------------------------------------------------------- drafters
class RowDrafters(Drafter):
    """Per-row drafters: ``kinds[b]`` names row ``b``'s drafter, ``subs[kind]`` drafts for
    that kind's rows (in lane order). Drafts are merged into one ``Draft`` (a one-hot ``q``
    for deterministic rows when some drafter gives probabilities)."""

    name = "mixed"

    def __init__(self, kind, drafter: Drafter, rows: int):
        self.subs: dict = {kind: drafter}
        self.kinds: list = [kind] * rows
        self.on_error = None  # on_error(rows, exc): the rows whose sub-drafter raised (else it raises)

    def _failed(self, pos: list[int], exc: Exception) -> None:
        if self.on_error is None:
            raise exc
        self.on_error(pos, exc)

    def prefill(self, req) -> None:
        """Each sub-drafter is prefilled with its own rows of ``req``."""
        for kind, sub in self.subs.items():
            rows = torch.tensor(_positions(self.kinds, kind))
            own = req
            if len(rows) < len(self.kinds):
                index = rows.to(req.input_ids.device)
                own = replace(req, input_ids=req.input_ids[index], attention_mask=req.attention_mask[index],
                              shared=None)
            sub.prefill(own)

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        bsz = len(rows)
        tokens = torch.zeros(bsz, k, dtype=torch.long)  # [B, k]
        drafted = torch.zeros(bsz, dtype=torch.long)  # [B]
        evidence, parts = [0] * bsz, []
        for kind, sub in self.subs.items():
            pos = _positions(self.kinds, kind)
            try:
                draft = sub.propose([rows[i] for i in pos], k)
            except Exception as exc:  # these rows draft nothing this step; their requests fail
                self._failed(pos, exc)
                continue
            index = torch.tensor(pos)
            width = min(draft.k, k)
            tokens[index, :width] = draft.tokens[:, :width].cpu()
            drafted[index] = draft.drafted.cpu().clamp(max=k)
            for i, level in zip(pos, draft.evidence or [0] * len(pos), strict=True):
                evidence[i] = level
            parts.append((index, draft))
        return Draft(tokens, drafted, _merged_q(parts, tokens), evidence)

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        for kind, sub in self.subs.items():
            rows = torch.tensor(_positions(self.kinds, kind))
            part = Draft(_take(draft.tokens, rows), _take(draft.drafted, rows), _take(draft.q, rows),
                         None if draft.evidence is None else [draft.evidence[i] for i in rows.tolist()])
            try:
                sub.update(part, VerifyResult(_take(result.accepted, rows), _take(result.next_tokens, rows)),
                           _take(p, rows))
            except Exception as exc:
                self._failed(rows.tolist(), exc)

    def select_rows(self, index: Tensor) -> None:
        keep = index.tolist()
        kept = set(keep)
        for kind in list(self.subs):
            local = _kept(_positions(self.kinds, kind), kept)
            if not local:
                del self.subs[kind]
            elif len(local) < self.kinds.count(kind):
                self.subs[kind].select_rows(torch.tensor(local))
        self.kinds = [self.kinds[i] for i in keep]

    def add_rows(self, other: Drafter) -> None:
        if not isinstance(other, RowDrafters):
            raise NotImplementedError(f"drafter {self.name!r} cannot take rows of drafter {other.name!r}")
        for kind, sub in other.subs.items():
            if kind in self.subs:
                self.subs[kind].add_rows(sub)
            else:
                self.subs[kind] = sub
        self.kinds += other.kinds

    def step_cost(self, batch: int) -> float:
        return sum(sub.step_cost(batch) for sub in self.subs.values())


def _merged_q(parts: list[tuple[Tensor, Draft]], tokens: Tensor) -> Tensor | None:
    """``[B, k, V]`` drafter probabilities when some sub-drafter gave them (one-hot for the
    deterministic rows), else None."""
    given = [(index, d) for index, d in parts if d.q is not None]
    if not given:
        return None
    vocab, like = given[0][1].q.shape[-1], given[0][1].q
    q = nn.functional.one_hot(tokens, vocab).to(like.dtype).to(like.device)  # [B, k, V]
    for index, draft in given:
        width = min(draft.k, tokens.shape[1])
        q[index.to(q.device), :width] = draft.q[:, :width]
    return q
