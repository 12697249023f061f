"""Drafting without a draft model: n-gram counts (NASD) and prompt lookup.

Both drafters are deterministic (``q = None``): the target verifies their drafts in the one
speculative loop (``speculative.speculative_loop``) with the shared rejection sampler, which
accepts a draft ``x`` with probability ``p(x)`` and on rejection samples ``p`` without ``x``.
Greedy output is therefore token-identical to greedy decoding, sampled output follows ``p``.

* **NASD** (n-gram assisted speculative decoding, strategy ``"ngram"``): each row owns an
  ``NGramStorage`` initialised from its prompt. After every verify step the emitted tokens
  (accepted drafts + the recovered/bonus token) are counted, and with ``filler_top_k > 1``
  also the target's top-k tokens at each verified position. Drafts chain the storage's
  predictions (backoff to the longest known context).
* **Prompt lookup** (strategy ``"prompt_lookup"``): the longest suffix of the row's text
  (``ngram_n`` tokens down to 1) that occurred before, anywhere in prompt + generated text;
  the most recent occurrence wins; the tokens that followed it are the drafts (a match that
  runs into the present continues periodically, which drafts repetitions in full).
  transformers takes the *first* (oldest), shortest-first match instead.

Draft length (``draft_policy``): any policy of ``draft_policy.py`` except ``egag`` (which
reads a draft model's probabilities). The default, ``adaptive``, decides per row and per
*evidence level* (``Draft.evidence``: prompt lookup's match length, NASD's n-gram order of
the first draft) how many drafts pay for their verification cost, possibly none: on a CPU a
forward over ``k + 1`` tokens is measurably slower than over 1, and on open chat fixed
drafting is much slower than greedy decoding.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from decodekit.model_info import vocab_size
from decodekit.ngram_storage import INgramStorage, NGramStorage, update_many
from decodekit.outputs import GenerationOutput
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.draft_policy import POLICIES, AcceptanceGate, DraftOptions
from decodekit.strategies.drafting import Draft, Drafter
from decodekit.strategies.forced import with_forced_drafts
from decodekit.strategies.options import option
from decodekit.strategies.session import speculative_loop
from decodekit.strategies.verify import VerifyResult
from decodekit.validation import DecodeKitError

__all__ = [
    "make_ngram_drafter",
    "make_prompt_lookup_drafter",
    "AcceptanceGate",
    "NgramDrafter",
    "PromptLookupDrafter",
    "NgramOptions",
    "PromptLookupOptions",
    "decode",
    "decode_prompt_lookup",
    "prompt_lookup_candidates",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- drafters
class _DeterministicDrafter(Drafter):
    """Shared part of the n-gram drafters: candidates per row -> ``Draft`` (q=None) with the
    evidence level of each row. Subclasses implement ``start_row``,
    ``candidates(i, history, k) -> (level, tokens)`` and ``keep_rows``, and name their per-row
    lists in ``per_row``."""

    per_row: tuple[str, ...] = ()

    def prefill(self, req: DecodeRequest) -> None:
        for i, row in enumerate(req.prompt_rows()):
            self.start_row(i, row)

    def start_row(self, i: int, prompt: list[int]) -> None:
        raise NotImplementedError

    def candidates(self, i: int, history: list[int], k: int) -> tuple[int, list[int]]:
        raise NotImplementedError

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        levels, drafts = zip(*(self.candidates(i, history, k) for i, history in enumerate(rows)), strict=True)
        return _as_draft(list(drafts), list(levels))

    def select_rows(self, index: Tensor) -> None:
        self.keep_rows(index.tolist())

    def keep_rows(self, keep: list[int]) -> None:
        """Subclasses: reindex their per-row state."""

    def add_rows(self, other: Drafter) -> None:
        """Continuous batching: ``other``'s rows (same drafter kind) come after ours."""
        if type(other) is not type(self):
            raise NotImplementedError(f"drafter {self.name!r} cannot take rows of drafter {other.name!r}")
        for name in self.per_row:
            getattr(self, name).extend(getattr(other, name))


def _as_draft(drafts: list[list[int]], levels: list[int]) -> Draft:
    """Ragged per-row drafts (and their evidence levels) -> ``Draft`` as wide as the longest
    (zero width: plain step)."""
    width = max((len(d) for d in drafts), default=0)
    tokens = torch.zeros((len(drafts), width), dtype=torch.long)
    for b, d in enumerate(drafts):
        if d:
            tokens[b, : len(d)] = torch.tensor(d, dtype=torch.long)
    drafted = torch.tensor([len(d) for d in drafts], dtype=torch.long)
    return Draft(tokens, drafted, evidence=levels)


class NgramDrafter(_DeterministicDrafter):
    """NASD: one n-gram storage per row, updated with every verified position."""

    name = "ngram"
    per_row = ("storages", "counted", "fillers")

    def __init__(self, storage: INgramStorage, *, filler_top_k: int = 3, stop_if_unknown: bool = False,
                 share_storage: bool = False):
        self.template = storage
        self.filler_top_k = filler_top_k
        self.stop_if_unknown = stop_if_unknown
        self.share_storage = share_storage  # batch of one: use (and update) the caller's storage
        self.storages: list[INgramStorage] = []
        self.counted: list[int] = []  # history positions counted so far, per row
        self.fillers: list[list[list[int]] | None] = []  # target top-k per verified position
        self.proposed = False

    def start_row(self, i: int, prompt: list[int]) -> None:
        storage = self.template if self.share_storage else copy.deepcopy(self.template)
        storage.initialize(prompt)
        self.storages.append(storage)
        self.counted.append(len(prompt))
        self.fillers.append(None)

    def count_new_tokens(self, i: int, history: list[int]) -> None:
        """Count the tokens emitted since the last proposal (with their fillers)."""
        start = self.counted[i]
        if start < len(history):
            update_many(self.storages[i], history, start, self.fillers[i])
        self.counted[i] = len(history)
        self.fillers[i] = None

    def candidates(self, i: int, history: list[int], k: int) -> tuple[int, list[int]]:
        self.count_new_tokens(i, history)
        storage = self.storages[i]
        level = storage.lookup(history[len(history) - storage.n + 1 :])[1]
        if level == 0 and self.stop_if_unknown:
            return 0, []
        return level, storage.draft(history, k, stop_if_unknown=self.stop_if_unknown)

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        self.proposed = True
        return super().propose(rows, k)

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        # fillers belong to the positions right after the last proposal: only if there was one
        if self.filler_top_k > 1 and self.proposed:
            self.fillers = _top_tokens(p, result.accepted, self.filler_top_k)
        self.proposed = False

    def keep_rows(self, keep: list[int]) -> None:
        self.storages = [self.storages[i] for i in keep]
        self.counted = [self.counted[i] for i in keep]
        self.fillers = [self.fillers[i] for i in keep]


def _top_tokens(p: Tensor, accepted: Tensor, k: int) -> list[list[list[int]]]:
    """Target's top-``k`` tokens (probability > 0, best first) at each verified position:
    ``p [B, k+1, V]`` -> per row, ``accepted[b] + 1`` lists. Under greedy ``p`` is one-hot,
    so only the argmax (the emitted token) remains."""
    width = int(accepted.max()) + 1
    probs, idx = p[:, :width].topk(min(k, p.shape[-1]), dim=-1)  # [B, w, k]
    probs, idx = probs.tolist(), idx.tolist()
    out = []
    for b, a in enumerate(accepted.tolist()):
        out.append([[t for t, q in zip(idx[b][i], probs[b][i], strict=True) if q > 0] for i in range(a + 1)])
    return out


def prompt_lookup_candidates(index: list[dict], history: list[int], k: int) -> tuple[int, list[int]]:
    """Longest suffix match (``len(index)`` tokens down to 1), most recent occurrence first.

    ``index[m - 1]`` maps every ``m``-gram ending before the last token to the position of
    its latest end. Returns ``(match length, up to k following tokens)``; ``(0, [])``
    without a match. A match ending right before the suffix continues periodically.
    """
    n_hist = len(history)
    for m in range(min(len(index), n_hist - 1), 0, -1):
        end = index[m - 1].get(tuple(history[n_hist - m :]))
        if end is None:
            continue
        out: list[int] = []
        for j in range(k):
            pos = end + 1 + j
            out.append(history[pos] if pos < n_hist else out[pos - n_hist])
        return m, out
    return 0, []


class PromptLookupDrafter(_DeterministicDrafter):
    """Prompt lookup: drafts copied from the row's own text after the longest suffix match."""

    name = "prompt_lookup"
    per_row = ("index", "indexed")

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram
        self.index: list[list[dict]] = []  # per row: m-gram -> latest end position
        self.indexed: list[int] = []  # per row: positions whose n-grams are in the index

    def start_row(self, i: int, prompt: list[int]) -> None:
        self.index.append([{} for _ in range(self.max_ngram)])
        self.indexed.append(0)

    def extend_index(self, i: int, history: list[int]) -> None:
        """Index the n-grams ending at positions ``indexed .. len - 2`` (not the suffix)."""
        index = self.index[i]
        for end in range(self.indexed[i], len(history) - 1):
            for m in range(1, min(self.max_ngram, end + 1) + 1):
                index[m - 1][tuple(history[end - m + 1 : end + 1])] = end
        self.indexed[i] = max(self.indexed[i], len(history) - 1)

    def candidates(self, i: int, history: list[int], k: int) -> tuple[int, list[int]]:
        self.extend_index(i, history)
        return prompt_lookup_candidates(self.index[i], history, k)

    def keep_rows(self, keep: list[int]) -> None:
        self.index = [self.index[i] for i in keep]
        self.indexed = [self.indexed[i] for i in keep]


# ---------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class PromptLookupOptions(DraftOptions):
    """Options of strategy ``"prompt_lookup"``."""

    draft_policy: str = option("adaptive", "how many tokens to draft each step (adaptive: only "
                               "where measured acceptance pays)", str, choices=POLICIES)
    ngram_n: int = option(3, "longest suffix (n-gram order) matched", int, min=2)
    show_drafts: bool = option(False, "record accepted drafts and target tokens for display", bool)


@dataclass(frozen=True)
class NgramOptions(PromptLookupOptions):
    """Options of strategy ``"ngram"`` (NASD)."""

    filler_top_k: int = option(3, "the target's top-k at each verified position update the counts",
                               int, min=1)
    stop_if_unknown: bool = option(False, "stop drafting at an unknown context", bool)
    first_target: bool = option(True, "the first token of a step comes from the target", bool)
    storage: object = option(None, "an INgramStorage to draft from (API only)", "any", cli=False)

    def validate(self) -> None:
        super().validate()
        if self.storage is not None and not isinstance(self.storage, INgramStorage):
            raise DecodeKitError(f"storage must be an INgramStorage, got {type(self.storage).__name__}")


def make_ngram_drafter(req: DecodeRequest, opts: NgramOptions) -> NgramDrafter:
    """The ``NgramDrafter`` of ``opts`` for ``req``'s rows: ``opts.storage`` or a new
    ``NGramStorage``, checked against the model's vocabulary; a batch of one uses (and
    updates) the caller's storage itself. ``decode`` and the server both build it here."""
    vocab = vocab_size(req.model)
    storage = opts.storage if opts.storage is not None else NGramStorage(opts.ngram_n, vocab)
    if storage.vocab_size != vocab:
        raise DecodeKitError(
            f"n-gram storage vocab_size ({storage.vocab_size}) does not match the model's "
            f"vocabulary ({vocab} tokens)"
        )
    return NgramDrafter(storage, filler_top_k=opts.filler_top_k, stop_if_unknown=opts.stop_if_unknown,
                        share_storage=req.input_ids.shape[0] == 1)


def make_prompt_lookup_drafter(req: DecodeRequest, opts: PromptLookupOptions) -> PromptLookupDrafter:
    """The ``PromptLookupDrafter`` of ``opts`` (``decode_prompt_lookup`` and the server)."""
    return PromptLookupDrafter(opts.ngram_n)


def decode(req: DecodeRequest, opts: NgramOptions) -> GenerationOutput:
    """N-gram assisted speculative decoding (strategy ``"ngram"``), batched.

    ``ngram_n``: largest n-gram order (orders 2..n, backoff); ``gamma``: drafts per step;
    ``filler_top_k``: the target's top-k at each verified position also update the counts
    (1: only emitted tokens); ``stop_if_unknown``: stop drafting at an unknown context;
    ``draft_policy``: ``adaptive`` (default; see the module docstring: on open chat fixed
    drafting is much slower than greedy on a CPU) | ``fixed`` | ``cost``. ``storage``: an
    ``INgramStorage`` to use instead of ``NGramStorage(ngram_n, vocab)``; each row drafts
    from its own copy (a single row uses and updates the instance itself).
    """
    return speculative_loop(req, make_ngram_drafter(req, opts), opts.policy(), first_target=opts.first_target,
                            show_drafts=opts.show_drafts)


def decode_prompt_lookup(req: DecodeRequest, opts: PromptLookupOptions) -> GenerationOutput:
    """Prompt lookup decoding (strategy ``"prompt_lookup"``), batched.

    ``ngram_n``: longest suffix tried (down to 1 token); ``gamma``: at most this many
    drafts copied per step; ``draft_policy``: ``adaptive`` (default: drafts only where the
    measured acceptance pays for them; never much slower than greedy) | ``fixed`` | ``cost``.
    With a constraint, the tokens the grammar forces are drafted first (``strategies.forced``).
    """
    drafter = with_forced_drafts(req, make_prompt_lookup_drafter(req, opts))
    return speculative_loop(req, drafter, opts.policy(), show_drafts=opts.show_drafts)

