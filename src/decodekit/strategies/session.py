"""The decode loop: a drafter proposes tokens, the target verifies them in ONE forward.

Every speculative strategy (draft model, self-speculative ``layers:N``, n-grams, prompt
lookup) runs the one loop of this module, ``speculative_loop``, over a ``DecodeSession``;
they differ only in their ``Drafter`` (``drafting.py``). The server drives the same session
step by step (``session.begin()``, ``session.step()``, ``session.add_rows()`` between steps). One step, for a batch of rows that each accept a different number of drafts:

1. the draft-length policy picks a budget per row (``draft_policy.py``: fixed, EGAG, cost,
   adaptive), capped by the row's remaining tokens (drafts past ``max_new_tokens`` are waste),
2. the drafter proposes ``k`` tokens per row (``Draft``: tokens, how many are real, ``q``);
   the policy may keep only a prefix of each row's drafts (``adaptive``),
3. the target runs ``[last token, drafts]`` (``k + 1`` tokens) through its KV cache once,
4. ``verify`` (the shared rejection sampler) accepts a prefix per row and draws the
   recovered (after a rejection) or bonus (all accepted) token,
5. accepted drafts + that token go to the tracker; the target cache is rolled back per row
   (``ModelState.rollback``: rows that accepted fewer drafts get masked holes, so the batch
   never falls back to one row at a time); the drafter is told the result,
6. finished rows leave the batch; holes are compacted away now and then.

Greedy verification against a one-hot target reproduces greedy decoding token for token;
under sampling the output is distributed exactly as the target's (``verify.py``).
``first_target=False``: the target is prefilled with the prompt minus its last token, so
the drafter proposes the very first tokens too and the first verify step checks them.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor

from decodekit.cache import ModelState
from decodekit.outputs import GenerationOutput
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.draft_policy import DraftPolicy, make_policy
from decodekit.strategies.drafting import Draft, Drafter, maybe_compact
from decodekit.strategies.verify import VerifyResult, verify

__all__ = ["DecodeSession", "speculative_loop"]

log = logging.getLogger(__name__)


class DecodeSession:
    """The mutable batch of one generation (kept in one place so that dropping finished rows
    updates every part of it together). ``begin()`` prefills, each ``step()`` drafts, verifies
    and emits; between steps ``add_rows()`` merges another session's rows (continuous
    batching). ``speculative_loop`` is ``begin()`` then ``step()`` until the tracker is done."""

    def __init__(self, req: DecodeRequest, drafter: Drafter, policy: DraftPolicy, trace: bool):
        self.req, self.drafter, self.policy = req, drafter, policy
        self.rows = req.prompt_rows()  # histories
        self.trace = [[] for _ in self.rows] if trace else None  # (token, kind) per caller row
        self.state: ModelState | None = None
        self.last: Tensor | None = None  # [B] the latest token, not yet fed to the target

    def emit(self, tokens: list[list[int]], kinds: list[list[str]], scores: Tensor) -> list[bool]:
        """Push tokens of the active rows to the tracker and the histories; ``scores [B, K, V]``:
        the target's processed scores each token was chosen from (for log-probabilities)."""
        tracker = self.req.tracker
        before = [len(tracker.tokens[r]) for r in tracker.active]
        active = list(tracker.active)
        finished = tracker.push(tokens, scores)
        for i, row in enumerate(active):
            self.rows[i].extend(tokens[i])
            if self.trace is not None:
                kept = len(tracker.tokens[row]) - before[i]
                self.trace[row].extend(zip(tokens[i][:kept], kinds[i][:kept]))
        return finished

    def remaining(self) -> Tensor:
        """``[B]`` tokens each active row may still emit."""
        tracker = self.req.tracker
        return torch.tensor([tracker.max_new_tokens - len(tracker.tokens[r]) for r in tracker.active])

    def count_forwards(self) -> None:
        """Credit the target's and the drafter's forwards so far to the active rows."""
        self.req.tracker.count_forwards(self.state)
        if self.drafter.state is not None:
            self.req.tracker.count_forwards(self.drafter.state, drafter=True)

    def drop_finished(self, finished: list[bool]) -> None:
        self.count_forwards()
        keep = self.req.tracker.drop_finished(finished)
        if keep is None or self.req.tracker.done:
            return
        self.state.select_rows(keep)
        self.drafter.select_rows(keep)
        self.policy.select_rows(keep)
        self.req.processor.select_rows(keep.tolist())  # per-row processors (a serving batch)
        self.rows = [self.rows[i] for i in keep.tolist()]
        self.last = self.last.index_select(0, keep.to(self.last.device))

    def maybe_compact(self) -> None:
        maybe_compact(self.state)

    def begin(self, first_target: bool = True) -> None:
        """Prefill the target, the drafter and the policy (``_begin``)."""
        _begin(self, first_target)

    def step(self, skip_sample_adjustment: bool = False) -> None:
        """One draft-verify-emit step of the active rows (``_step``)."""
        _step(self, skip_sample_adjustment)

    def add_rows(self, other: DecodeSession) -> None:
        """Continuous batching: the active rows of ``other`` (a run of the same drafter kind
        and policy, started with ``begin()`` on its own requests) join this batch between steps.
        The tracker's rows are the caller's to join (``decodekit.serve``)."""
        if self.trace is not None or other.trace is not None:
            raise ValueError("runs that record a trace cannot take rows")
        self.count_forwards()
        other.count_forwards()
        self.state.add_rows(other.state)
        self.policy.add_rows(other.policy)  # before the drafter's (EGAG counts its rows)
        self.drafter.add_rows(other.drafter)
        self.req.processor.add_rows(other.req.processor)
        self.rows += other.rows
        self.last = torch.cat([self.last, other.last.to(self.last.device)])  # [B + B']


def _begin(run: DecodeSession, first_target: bool) -> None:
    """Prefill the target, the drafter and the policy; with ``first_target`` the target's first
    token is emitted (and rows it finishes leave)."""
    _start(run, first_target)
    run.drafter.prefill(run.req)
    run.policy.start(run.req, run.drafter)
    if first_target:
        first = run.last.tolist()
        finished = run.emit([[t] for t in first], [["target"]] * len(first), run.scores[:, None])
        run.drop_finished(finished)


def _start(run: DecodeSession, first_target: bool) -> None:
    """Prefill the target; with ``first_target`` it also emits the first token."""
    req = run.req
    if first_target:
        run.state, logits = req.prefill()
        run.scores = req.scores(logits[:, -1])  # [B, V]
        run.last = req.processor.sample(req.processor.distribution(run.scores), generator=req.generator)
        return
    run.state, _ = req.prefill(drop_last=True)
    run.last = req.input_ids[:, -1]  # the prompt's last token is verified together with the first drafts


def _cap(draft: Draft, limits: Tensor) -> Draft:
    """Drafts beyond each row's budget ``limits [B]`` are not drafts."""
    drafted = torch.minimum(draft.drafted.to(limits.device), limits)
    return replace(draft, drafted=drafted)


def _narrow(draft: Draft) -> Draft:
    """Drop draft columns no row uses: the verify forward then feeds only ``max(drafted)``
    drafts (masked, unused columns would cost compute and the model's masked path)."""
    k = int(draft.drafted.max()) if draft.drafted.numel() else 0
    if k == draft.k:
        return draft
    return replace(draft, tokens=draft.tokens[:, :k], q=None if draft.q is None else draft.q[:, :k])


def _target_scores(run: DecodeSession, draft: Draft) -> Tensor:
    """ONE target forward over ``[last, drafts]`` -> processed scores ``[B, k+1, V]``:
    position ``j`` is processed with the history that includes drafts ``0..j-1``, so history
    processors (penalties...) stay exact under speculation."""
    state = run.state
    k = draft.k
    device = state.ids.device
    drafts = draft.tokens.to(device).clamp_min(0)  # [B, k]
    tokens = torch.cat([run.last[:, None].to(device), drafts], dim=1)
    real = torch.arange(k + 1, device=device)[None, :] <= draft.drafted.to(device)[:, None]  # [B, k+1]
    logits = state.extend(tokens, token_mask=real.long())  # [B, k+1, V]
    histories = None
    if run.req.processor.needs_history:
        histories = [row + d for row, d in zip(run.rows, drafts.tolist())]
    return run.req.scores(logits, histories)


def _emitted(draft: Draft, result: VerifyResult) -> tuple[list[list[int]], list[list[str]]]:
    """Per row: accepted drafts + the recovered/bonus token, and what each token is."""
    drafts = draft.tokens.tolist()
    accepted = result.accepted.tolist()
    drafted = draft.drafted.tolist()
    nxt = result.next_tokens.tolist()
    tokens, kinds = [], []
    for b, a in enumerate(accepted):
        tokens.append(drafts[b][:a] + [nxt[b]])
        last_kind = "recovered" if a < drafted[b] else ("bonus" if drafted[b] else "target")
        kinds.append(["draft"] * a + [last_kind])
    return tokens, kinds


def _draft(run: DecodeSession) -> Draft:
    """Steps 1-2: the policy's budget per row, capped by the row's remaining tokens (drafts
    past ``max_new_tokens`` can never be kept; the cap never goes below the policy's
    ``gamma_min``), then the drafter's proposal."""
    limits = run.policy.choose(run.rows).to(torch.long)  # [B] draft budget per row
    cap = run.remaining().clamp_min(run.policy.gamma_min)  # [B]
    limits = torch.minimum(limits, cap.to(limits.device))
    k = int(limits.max()) if limits.numel() else 0
    draft = run.drafter.propose(run.rows, k) if k > 0 else Draft.empty(len(run.rows), limits.device)
    draft = _cap(draft, limits.to(draft.drafted.device))
    return _narrow(run.policy.trim(draft, run.rows))


def _step(run: DecodeSession, skip_sample_adjustment: bool) -> None:
    req = run.req
    draft = _draft(run)  # 1-2
    scores = _target_scores(run, draft)  # 3: [B, k+1, V]
    p = req.processor.distribution(scores)  # [B, k+1, V]
    result = verify(p, draft.tokens.to(p.device), draft.drafted, draft.q,  # 4
                    greedy=req.processor.greedy_rows, generator=req.generator,
                    skip_sample_adjustment=skip_sample_adjustment)
    run.state.rollback(draft.k - result.accepted)  # 5: keep [last, accepted drafts]
    run.drafter.update(draft, result, p)
    run.policy.observe(draft.drafted, result.accepted)
    req.tracker.record_verify(draft.drafted.tolist(), result.accepted.tolist())
    if req.debug:
        log.info("verify: drafted %s accepted %s", draft.drafted.tolist(), result.accepted.tolist())
    tokens, kinds = _emitted(draft, result)
    run.last = result.next_tokens
    finished = run.emit(tokens, kinds, scores)
    run.drop_finished(finished)  # 6
    if not req.tracker.done:
        run.maybe_compact()


@torch.inference_mode()
def speculative_loop(
    req: DecodeRequest,
    drafter: Drafter,
    policy: DraftPolicy | int = 5,
    *,
    first_target: bool = True,
    skip_sample_adjustment: bool = False,
    show_drafts: bool = False,
) -> GenerationOutput:
    """THE speculative decoding loop (see the module docstring) for any ``Drafter``.

    ``policy``: a ``DraftPolicy`` or an int (fixed number of drafts per step).
    ``show_drafts`` (or ``req.debug``): ``GenerationOutput.debug[row]`` is the list of
    ``(token, kind)`` of the row's emitted tokens, kind one of ``"draft"`` (accepted draft),
    ``"recovered"`` (target token after a rejection), ``"bonus"`` (target token after all
    drafts were accepted), ``"target"`` (target token with no drafts to verify);
    ``decodekit.visual.render_drafts`` shows it.
    """
    if isinstance(policy, int):
        policy = make_policy("fixed", gamma=policy)
    policy.check(drafter)  # before any forward
    session = DecodeSession(req, drafter, policy, trace=show_drafts or req.debug)
    session.begin(first_target)
    while not req.tracker.done:
        session.step(skip_sample_adjustment)
    return req.tracker.result(debug=session.trace)
