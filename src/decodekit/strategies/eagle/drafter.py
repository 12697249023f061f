"""``EagleDrafter``: chain drafting with an EAGLE head on the target's hidden states, and
``resolve_eagle`` for the ``eagle`` / ``eagle:DIR`` drafter specs."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor, nn

from decodekit.cache import ModelState, left_pad
from decodekit.costs import CostCurve, monotone
from decodekit.quant import quant_kernel
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.drafting import Draft, Drafter, chain_draft, draw_draft, maybe_compact
from decodekit.strategies.eagle.head import EagleHead, HeadModel, capture_hidden, take_hidden
from decodekit.strategies.eagle.storage import HEAD_FILE, load_head, shipped_head_dir
from decodekit.strategies.verify import VerifyResult
from decodekit.validation import DecodeKitError

__all__ = ["EagleDrafter", "resolve_eagle"]


class EagleDrafter(Drafter):
    """Chain drafting with an ``EagleHead`` on the target's hidden states.

    Head column ``j`` of row ``b`` is the pair ``(f_j, x_{j+1})``. ``pending[b]`` holds the
    target features the head has not consumed yet (the prompt's at first, then each verify
    forward's kept ones: ``[last, accepted drafts]``). ``propose`` feeds the pending pairs
    (right aligned, left padding masked), drafts from the last output, and feeds its own
    predicted features for drafts ``2..k``; ``update`` crops those ``k - 1`` self-fed columns
    (the target's true features replace them) and queues the new features.
    """

    name = "eagle"

    def __init__(self, target, head: EagleHead):
        self.target, self.head = target, head
        self.model = head.__dict__.setdefault("_state_model", HeadModel(head))  # one per head (add_rows)
        self.memory = head.__dict__.setdefault("_drafter_memory", {})
        self.state: ModelState | None = None
        self.req: DecodeRequest | None = None  # set by prefill
        self.pending: list[Tensor] = []
        self.consumed: list[int] = []
        self.fed = 0
        self._costs: dict[tuple[int, bool], float] = head.__dict__.setdefault("_step_costs", {})  # (batch, greedy)
        self._feeds: dict[int, CostCurve] = head.__dict__.setdefault("_feed_costs", {})  # batch -> feed(width)
        capture_hidden(target)

    def prefill(self, req: DecodeRequest) -> None:
        """Take the prompt's features from the target's prefill (which ran just before)."""
        self.req = req
        batch = req.input_ids.shape[0]
        self.state = ModelState.empty(self.model, batch)
        self.consumed, self.fed = [0] * batch, 0
        hidden = take_hidden(self.target)  # [B or P, T', H]
        if hidden is None:  # nothing fed (a one-token prompt without first_target)
            self.pending = [self._no_features() for _ in range(batch)]
            return
        if req.shared is not None:
            hidden = hidden.index_select(0, req.shared.to(hidden.device))
        mask = req.attention_mask[:, : hidden.shape[1]].to(hidden.device).bool()  # [B, T']
        self.pending = [h[m] for h, m in zip(hidden, mask)]

    def _no_features(self) -> Tensor:
        return torch.zeros(0, self.head.config.hidden_size, dtype=self.head.fc.weight.dtype, device=self.head.device)

    def _feed(self, tokens: Tensor, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pairs ``tokens [B, n]`` / ``features [B, n, H]`` into the head's cache -> the last
        column's predicted features ``[B, H]``."""
        self.model.features = features
        return self.state.extend(tokens, token_mask=mask, logits_to_keep=1)[:, -1]

    def _feed_pending(self, rows: list[list[int]]) -> Tensor:
        """Every row's pending pairs at once -> ``[B, H]`` (garbage for a row with none: it
        drafts nothing)."""
        width = max(len(p) for p in self.pending)
        tokens = [r[c + 1: c + 1 + len(p)] for r, c, p in zip(rows, self.consumed, self.pending)]
        ids, mask = left_pad(tokens, self.req.pad_token_id)  # [B, n]
        feats = torch.stack([nn.functional.pad(p, (0, 0, width - len(p), 0)) for p in self.pending])
        hidden = self._feed(ids, feats, mask)
        self.consumed = [c + len(p) for c, p in zip(self.consumed, self.pending)]
        self.pending = [p[:0] for p in self.pending]
        return hidden

    def _draw(self, hidden: Tensor, rows: list[list[int]] | None) -> tuple[Tensor, Tensor]:
        """Predicted features ``[B, H]`` -> ``q [B, V]`` (processed like p, zero outside the
        draft vocabulary) and a draft ``[B]``."""
        logits = self.head.full_logits(self.head.logits(hidden)).float()  # [B, V]
        return draw_draft(self.req, logits, rows)

    def _feed_draft(self, x: Tensor, hidden: Tensor) -> Tensor:
        """Draft ``x [B]`` with the features ``[B, H]`` it was drawn from -> the next ``[B, H]``."""
        return self._feed(x[:, None].to(self.head.device), hidden[:, None])

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        ready = torch.tensor([len(p) > 0 for p in self.pending])  # [B] a row without features yet
        if not bool(ready.any()):  # (a one-token prompt without first_target) drafts nothing
            return Draft.empty(len(rows), self.head.device)
        hidden = self._feed_pending(rows)  # [B, H]
        tokens, q = chain_draft(self.req, rows, k, hidden, self._draw, self._feed_draft)  # [B, k], [B, k, V]
        self.fed = max(k - 1, 0)
        drafted = torch.where(ready, k, 0).to(hidden.device)
        return Draft(tokens, drafted, q)

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        self.state.crop(self.fed)  # the head's own features: replaced by the target's below
        self.fed = 0
        hidden = take_hidden(self.target)  # [B, k+1, H]: this verify forward's [last, drafts]
        if hidden is None:
            raise RuntimeError("eagle drafter: the target's verify forward left no hidden states")
        hidden = hidden[:, hidden.shape[1] - draft.k - 1:]
        kept = (result.accepted + 1).tolist()  # [last, accepted drafts]
        self.pending = [torch.cat([p, h[:n].to(p.dtype)]) for p, h, n in zip(self.pending, hidden, kept)]
        maybe_compact(self.state)

    def select_rows(self, index: Tensor) -> None:
        self.state.select_rows(index)
        keep = index.tolist()
        self.pending = [self.pending[i] for i in keep]
        self.consumed = [self.consumed[i] for i in keep]

    def add_rows(self, other: Drafter) -> None:
        """Continuous batching: the rows of ``other`` (a drafter of the same head, prefilled
        for the joining rows) come after ours (between steps nothing self-fed is held)."""
        if not isinstance(other, EagleDrafter) or other.head is not self.head:
            raise NotImplementedError("only a drafter of the same eagle head can take rows")
        self.state.add_rows(other.state)
        self.pending += other.pending
        self.consumed += other.consumed

    def step_cost(self, batch: int) -> float:
        """Seconds of one drafting step for ``batch`` rows as ``propose`` takes it: feed one
        pair, then the head's logits, mapped to the full vocabulary and processed like the
        target's (``_timed_draw``: the processor's cost counts, a sampling one more than greedy),
        after 64 tokens of context; measured once per batch size and kind of processor (before
        a request: unprocessed)."""
        greedy = self.req is None or self.req.processor.is_greedy
        if (batch, greedy) not in self._costs:
            self._costs[(batch, greedy)] = self._on_scratch(batch, self._time_step)
        return self._costs[(batch, greedy)]

    def setup_cost(self, level: int, batch: int) -> float:
        """Drafting now first feeds every row's pending features (as wide as the widest row's:
        after a stretch of prompt-lookup copies, many), where a drafting step feeds one pair:
        the difference, from the head's feed times by width (``feed_costs``)."""
        width = max((len(p) for p in self.pending), default=0)
        if width <= 1:
            return 0.0
        feed = self.feed_costs(batch)
        return max(feed(width) - feed(1), 0.0)

    def feed_costs(self, batch: int) -> CostCurve:
        """Seconds of feeding ``n`` pairs per row into the head after 64 of context, for ``n``
        in 1..32 (linear in between, extended beyond), measured once per batch size."""
        if batch not in self._feeds:
            self._feeds[batch] = self._on_scratch(batch, self._time_feeds)
        return self._feeds[batch]

    @torch.inference_mode()
    def _on_scratch(self, batch: int, measure):
        """``measure(hidden [B, H])`` on a scratch head state of ``batch`` rows holding 64 pairs of
        context (``hidden``: its last predicted features); the drafter's own state is untouched."""
        state, self.state = self.state, ModelState.empty(self.model, batch)
        try:
            device = self.head.device
            features = torch.zeros(batch, 64, self.head.config.hidden_size, dtype=self.head.fc.weight.dtype,
                                   device=device)
            return measure(self._feed(torch.zeros(batch, 64, dtype=torch.long, device=device), features))
        finally:
            self.state = state

    def _median_time(self, work, width: int) -> float:
        """Median of 3 runs of ``work()``, each feeding ``width`` columns the scratch state drops."""
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
            self.state.crop(width)
        return sorted(times)[1]

    def _time_feeds(self, hidden: Tensor) -> CostCurve:
        batch, dim = hidden.shape
        curve = CostCurve()
        for width in (1, 2, 4, 8, 16, 32):
            tokens = torch.zeros(batch, width, dtype=torch.long, device=hidden.device)  # [B, n]
            features = torch.zeros(batch, width, dim, dtype=self.head.fc.weight.dtype, device=hidden.device)  # [B, n, H]
            curve.points[width] = self._median_time(lambda t=tokens, f=features: self._feed(t, f), width)
        monotone(curve)
        return curve

    def _time_step(self, hidden: Tensor) -> float:
        return self._median_time(lambda: self._feed_draft(self._timed_draw(hidden), hidden), 1)

    def _timed_draw(self, hidden: Tensor) -> Tensor:
        """``_draw``'s work for ``hidden [B, H]`` -> argmax drafts ``[B]``, drawing nothing from the
        request's generator (a seeded sample must not depend on whether a cost was measured)."""
        logits = self.head.full_logits(self.head.logits(hidden)).float()  # [B, V]
        proc = None if self.req is None else self.req.processor
        if proc is not None and not proc.needs_history:  # history processors: their cost is left out
            logits = proc.distribution(proc.process_logits(None, logits))
        return logits.argmax(-1)


def resolve_eagle(spec: str, target) -> EagleDrafter:
    """``"eagle"`` (the shipped head) or ``"eagle:DIR"`` -> a new drafter (heads loaded once per
    target and kept on it)."""
    folder = shipped_head_dir(target) if spec == "eagle" else Path(spec[len("eagle:"):]).expanduser()
    if not str(folder):
        raise DecodeKitError("drafter eagle:DIR needs a directory")
    cache = target.__dict__.setdefault("_decodekit_eagle", {})
    head_file = folder / HEAD_FILE
    key = (str(folder.resolve()), head_file.stat().st_mtime_ns if head_file.is_file() else 0)
    if key not in cache:
        cache[key] = load_head(folder, target)
        if quant_kernel(target) == "decodekit":  # an int8 target: draft with int8 weights too
            cache[key].quantize_int8()
    return EagleDrafter(target, cache[key])
