"""Speculative decoding: a drafter proposes tokens, the target verifies them in ONE forward.

Every speculative strategy (draft model, self-speculative ``layers:N``, n-grams, prompt
lookup) runs the one loop of this module, ``speculative_loop``; they differ only in their
``Drafter``. One step, for a batch of rows that each accept a different number of drafts:

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

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from decodekit.cache import ModelState, left_pad
from decodekit.model_info import vocab_size
from decodekit.outputs import GenerationOutput
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.draft_policy import DraftOptions, DraftPolicy, make_policy
from decodekit.strategies.options import option
from decodekit.strategies.verify import VerifyResult, verify
from decodekit.validation import DecodeKitError, check_int

__all__ = [
    "Draft",
    "Drafter",
    "ModelDrafter",
    "speculative_loop",
    "early_exit_model",
    "resolve_drafter",
    "SpeculativeOptions",
    "decode",
]

log = logging.getLogger(__name__)

HOLES_PER_ROW_BEFORE_COMPACT = 16  # masked columns per row tolerated before compact()


# ---------------------------------------------------------------------------- interface
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


# ---------------------------------------------------------------------------- the loop
def maybe_compact(state: ModelState) -> None:
    """Remove holes when they pile up (or at once for sliding-window models)."""
    state.compact_holes(HOLES_PER_ROW_BEFORE_COMPACT)


class _Run:
    """The mutable batch of one speculative generation (kept in one place so that dropping
    finished rows updates every part of it together)."""

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

    def add_rows(self, other: _Run) -> None:
        """Continuous batching: the active rows of ``other`` (a run of the same drafter kind
        and policy, started with ``_begin`` on its own requests) join this batch between steps.
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


def _begin(run: _Run, first_target: bool) -> None:
    """Prefill the target, the drafter and the policy; with ``first_target`` the target's first
    token is emitted (and rows it finishes leave)."""
    _start(run, first_target)
    run.drafter.prefill(run.req)
    run.policy.start(run.req, run.drafter)
    if first_target:
        first = run.last.tolist()
        finished = run.emit([[t] for t in first], [["target"]] * len(first), run.scores[:, None])
        run.drop_finished(finished)


def _start(run: _Run, first_target: bool) -> None:
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


def _target_scores(run: _Run, draft: Draft) -> Tensor:
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


def _draft(run: _Run) -> Draft:
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


def _step(run: _Run, skip_sample_adjustment: bool) -> None:
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
    run = _Run(req, drafter, policy, trace=show_drafts or req.debug)
    _begin(run, first_target)
    while not req.tracker.done:
        _step(run, skip_sample_adjustment)
    return req.tracker.result(debug=run.trace)


# ---------------------------------------------------------------------------- draft model
class ModelDrafter(Drafter):
    """A causal LM with the target's vocabulary drafting autoregressively with its own cache.

    The drafter cache holds ``seen[b]`` tokens of row ``b``'s history. Tokens of the
    history it has not consumed (the whole prompt at first; later the target's
    recovered/bonus token, and the last accepted draft, which was sampled but never fed)
    are *pending*: the first draft forward feeds them all at once, right aligned with a
    token mask (left padding), and its logits give the first draft. Drafts ``1..k-1`` are fed to draw
    drafts ``2..k``; after verification the rejected ones are rolled back per row.
    """

    name = "model"

    def __init__(self, model):
        self.model = model
        self.memory = model.__dict__.setdefault("_decodekit_drafter_memory", {})
        self.state: ModelState | None = None
        self.seen: list[int] = []
        self.fed = 0  # drafts fed to the drafter in the last propose
        self._first: Tensor | None = None  # [B, V] logits for the first draft, if computed

    def prefill(self, req: DecodeRequest) -> None:
        """Lazy: the whole prompt is pending, so the first drafting forward prefills it (a
        policy that never drafts, e.g. ``cost`` with a slow drafter, never pays for it)."""
        self.req = req
        batch = req.input_ids.shape[0]
        self.state = ModelState.empty(self.model, batch, use_cache=req.use_cache)
        self.seen = [0] * batch
        self._first = None

    def first_logits(self, rows: list[list[int]]) -> Tensor:
        """Feed the pending tokens; logits ``[B, V]`` for the first draft (computed once)."""
        if self._first is not None and all(len(r) == s for r, s in zip(rows, self.seen)):
            return self._first
        pending = [r[s:] for r, s in zip(rows, self.seen)]
        tokens, mask = left_pad(pending, self.req.pad_token_id)  # right aligned, masked in front
        self._first = self.state.extend(tokens, token_mask=mask, logits_to_keep=1)[:, -1]
        self.seen = [len(r) for r in rows]
        return self._first

    def _draw(self, logits: Tensor, rows: list[list[int]] | None) -> tuple[Tensor, Tensor]:
        """``[B, V]`` logits -> ``q [B, V]`` and a draft ``[B]`` (``draw_draft``)."""
        return draw_draft(self.req, logits, rows)

    def _feed(self, x: Tensor, logits: Tensor) -> Tensor:
        """Draft ``x [B]`` into the drafter's cache -> logits ``[B, V]`` for the next draft."""
        return self.state.extend(x[:, None])[:, -1]

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        logits = self.first_logits(rows)  # [B, V]
        self._first = None
        self.proposed, q = chain_draft(self.req, rows, k, logits, self._draw, self._feed)  # [B, k], [B, k, V]
        self.fed = max(k - 1, 0)
        drafted = torch.full((len(rows),), k, dtype=torch.long, device=logits.device)
        return Draft(self.proposed, drafted, q)

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        """Keep the fed drafts that were accepted. The verified drafts may be another
        drafter's in some rows (a hybrid, ``strategies/hybrid.py``): only the prefix where
        ours agree with them is history; the rest is rolled back and fed later as pending."""
        kept = result.accepted.clamp(max=self.fed)  # [B] fed drafts that were accepted
        width = min(self.fed, draft.k)  # the verified draft may be narrower (trimmed)
        if width:
            ours = self.proposed[:, :width].to(draft.tokens.device)
            agree = (ours == draft.tokens[:, :width]).long().cumprod(-1).sum(-1)  # [B]
            kept = torch.minimum(kept, agree.to(kept.device))
        self.state.rollback(self.fed - kept)
        self.seen = [s + int(n) for s, n in zip(self.seen, kept.tolist())]
        self.fed = 0
        maybe_compact(self.state)

    def select_rows(self, index: Tensor) -> None:
        self.state.select_rows(index)
        self.seen = [self.seen[i] for i in index.tolist()]
        if self._first is not None:
            self._first = self._first.index_select(0, index.to(self._first.device))

    def add_rows(self, other: Drafter) -> None:
        """The joining rows' drafter state (usually nothing fed yet: their prompts are pending)
        comes after ours. First-draft logits computed for our rows but not used are dropped:
        their last token is rolled back and fed again with the joining rows' pending tokens."""
        if not isinstance(other, ModelDrafter) or other.model is not self.model:
            raise NotImplementedError("only a drafter of the same draft model can take rows")
        for drafter in (self, other):
            if drafter._first is not None:
                drafter.state.rollback(torch.ones(drafter.state.batch_size, dtype=torch.long))
                drafter.seen = [s - 1 for s in drafter.seen]
                drafter._first = None
        self.state.add_rows(other.state)
        self.seen += other.seen

    def step_cost(self, batch: int) -> float:
        """One draft forward of ``batch`` rows (one token each), measured at that batch size."""
        from decodekit.strategies.draft_policy import VerifyCost

        if getattr(self, "_cost", None) is None:
            self._cost = VerifyCost(self.model, 1)
        return self._cost(1, batch)


def early_exit_model(model, num_layers: int):
    """A view of ``model`` running only its first ``num_layers`` decoder layers, then its own
    final norm and LM head (self-speculative drafting). Shares every weight: no copy.
    """
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise DecodeKitError(
            f"drafter 'layers:N' needs a decoder with .model.layers; {type(model).__name__} has none"
        )
    check_int("drafter layers:N", num_layers, min_value=1, max_value=len(layers) - 1)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    short = copy.copy(decoder)
    short._modules = dict(decoder._modules)
    short._modules["layers"] = nn.ModuleList(list(layers)[:num_layers])
    short.config = config
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules["model"] = short
    view.config = config
    return view.eval()


# ---------------------------------------------------------------------------- options
def _check_tokenizers(target_tok, draft_tok) -> None:
    if target_tok is None or draft_tok is None:
        return
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise DecodeKitError("drafter's tokenizer differs from the target's: speculation needs "
                             "the same vocabulary (same token ids)")


def is_eagle_spec(drafter) -> bool:
    """``"eagle"`` (the shipped head) or ``"eagle:DIR"`` (a head from ``train-drafter``)."""
    return isinstance(drafter, str) and (drafter.strip() == "eagle" or drafter.strip().startswith("eagle:"))


def resolve_drafter(drafter, req: DecodeRequest) -> Drafter:
    """``drafter``: a ``Drafter``, a causal LM, ``"layers:N"``, ``"eagle"`` / ``"eagle:DIR"``
    (a trained draft head, ``strategies/eagle.py``) or a model spec for ``load_model``
    (bundled name, directory, .gguf). Checks vocabulary and device."""
    if isinstance(drafter, Drafter):
        return drafter
    if isinstance(drafter, str):
        if drafter.strip().endswith("+prompt_lookup"):  # prompt lookup where it matches, X elsewhere
            return _resolve_hybrid(drafter, req)
        match = re.fullmatch(r"layers:(\d+)", drafter.strip())
        if match:
            return ModelDrafter(early_exit_model(req.model, int(match.group(1))))
        if drafter.startswith("layers"):
            raise DecodeKitError(f"drafter {drafter!r}: write layers:N with N a number of layers")
        if is_eagle_spec(drafter):
            from decodekit.strategies.eagle import resolve_eagle

            return resolve_eagle(drafter.strip(), req.model)
        from decodekit.models import load_model

        backend = getattr(req.model, "decodekit_backend", None)  # llama.cpp: the drafter runs there too
        dtype = None if backend else next(req.model.parameters()).dtype
        model, tokenizer = load_model(drafter, dtype=dtype, device=str(req.model.device), param="drafter",
                                      backend=backend)
        _check_tokenizers(req.tokenizer, tokenizer)
        drafter = model
    if not isinstance(drafter, nn.Module) or not hasattr(drafter, "config"):
        raise DecodeKitError(
            f"drafter must be a causal LM, 'layers:N' or a model name/path; got {type(drafter).__name__}"
        )
    target_vocab, draft_vocab = vocab_size(req.model), vocab_size(drafter)
    if target_vocab != draft_vocab:
        raise DecodeKitError(
            f"drafter vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}): "
            "speculation needs the same tokenizer"
        )
    if drafter.device != req.model.device:
        raise DecodeKitError(f"drafter is on {drafter.device}, the target on {req.model.device}: "
                             "put both on the same device")
    drafter.eval()
    return ModelDrafter(drafter)


def _resolve_hybrid(spec: str, req: DecodeRequest) -> Drafter:
    """``"X+prompt_lookup"`` -> a ``HybridDrafter`` around drafter ``X`` (``strategies/hybrid.py``)."""
    from decodekit.strategies.hybrid import HybridDrafter, split_hybrid

    base, _ = split_hybrid(spec)
    if not base.strip():
        raise DecodeKitError(f"drafter {spec!r}: a hybrid drafter is X+prompt_lookup with X one drafter "
                             "(layers:N, eagle, a model name or path)")
    return HybridDrafter(resolve_drafter(base.strip(), req))


@dataclass(frozen=True)
class SpeculativeOptions(DraftOptions):
    """Options of strategy ``"speculative"``."""

    drafter: object = option(None, "draft model: bundled name, HF dir, .gguf, a loaded model, "
                             "layers:N (self-speculative: the target's first N layers), or eagle / "
                             "eagle:DIR (a trained draft head); X+prompt_lookup: prompt lookup where "
                             "the text repeats, X elsewhere", "any", parse=str)
    first_target: bool = option(True, "the first token of a step comes from the target", bool)
    skip_sample_adjustment: bool = option(False, "resample from p on rejection (LOSSY)", bool)
    show_drafts: bool = option(False, "record accepted drafts and target tokens for display", bool)

    def validate(self) -> None:
        super().validate()
        if self.drafter is None:
            raise DecodeKitError(
                "strategy 'speculative' needs drafter=... (a model, a model name, or layers:N)")


def decode(req: DecodeRequest, opts: SpeculativeOptions) -> GenerationOutput:
    """Speculative decoding with a draft model (strategy ``"speculative"``).

    ``opts.drafter``: a causal LM with the target's vocabulary, a model name/path for
    ``load_model``, or ``"layers:N"`` (self-speculative: the target's first N layers + its
    head, sharing weights), ``"X+prompt_lookup"`` (prompt lookup where the row's text
    repeats, ``X`` elsewhere: ``strategies/hybrid.py``). ``draft_policy``: ``"cost"``
    (default: up to ``gamma_max`` drafts, as many as pay for themselves at this batch size,
    none where drafting loses to greedy), ``"fixed"`` (``gamma`` drafts per step),
    ``"egag"`` / ``"adaptive"`` (up to ``gamma_max``, default ``gamma``; egag and cost at
    least ``gamma_min``). ``skip_sample_adjustment=True`` resamples from p on
    rejection: LOSSY.
    """
    drafter = resolve_drafter(opts.drafter, req)
    return speculative_loop(req, drafter, opts.policy(), first_target=opts.first_target,
                            skip_sample_adjustment=opts.skip_sample_adjustment,
                            show_drafts=opts.show_drafts)

