"""What every strategy receives: one validated, batched decoding request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from decodekit.cache import ModelState, left_pad
from decodekit.outputs import RowTracker
from decodekit.processors import LogitsPipeline


@dataclass
class DecodeRequest:
    model: Any  # a transformers causal LM
    input_ids: Tensor  # [B, T] left padded
    attention_mask: Tensor  # [B, T]
    processor: LogitsPipeline
    tracker: RowTracker
    max_new_tokens: int
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    generator: torch.Generator | None = None
    tokenizer: Any = None
    use_cache: bool = True
    debug: bool = False
    # num_return_sequences: row r holds a copy of prompt shared[r]; copies are prefilled once
    shared: Tensor | None = None  # [B] (None: every row its own prompt)
    # each tracker row's real prompt tokens, keyed like tracker.tokens (list or dict; filled on
    # first use by histories(); a serving lane keeps it as rows join and leave)
    prompts: list[list[int]] | dict[int, list[int]] | None = None

    def prefill(self, drop_last: bool = False) -> tuple[ModelState, Tensor | None]:
        """The prompts in a new ``ModelState`` (without their last token with ``drop_last``)
        and the last position's logits ``[B, 1, V]`` (None if nothing was fed). Rows that
        share a prompt (``shared``) are prefilled once, then their cache is forked."""
        ids, mask = self.input_ids, self.attention_mask  # [B, T]
        if drop_last:
            ids, mask = ids[:, :-1], mask[:, :-1]
        if ids.shape[1] == 0:
            return ModelState.empty(self.model, ids.shape[0], use_cache=self.use_cache), None
        if self.shared is None:
            return ModelState.prefill(self.model, ids, mask, use_cache=self.use_cache)
        shared = self.shared.cpu()  # [B] sorted prompt numbers 0..P-1
        first = torch.searchsorted(shared, torch.arange(int(shared[-1]) + 1))  # [P] each one's first row
        first = first.to(ids.device)
        state, logits = ModelState.prefill(self.model, ids[first], mask[first], use_cache=self.use_cache)
        state.select_rows(shared)  # fork: every copy gets its prompt's cache
        return state, logits.index_select(0, shared.to(logits.device))

    def prompt_rows(self) -> list[list[int]]:
        """The real prompt tokens of each row (left padding removed)."""
        return [row[m.bool()].tolist() for row, m in zip(self.input_ids.cpu(), self.attention_mask.cpu())]

    def histories(self) -> list[list[int]]:
        """Each active row's history (tracker order): its prompt + the tokens emitted so far."""
        if self.prompts is None:
            self.prompts = self.prompt_rows()
        return [self.prompts[r] + self.tracker.tokens[r] for r in self.tracker.active]

    def scores(self, logits: Tensor, rows: list[list[int]] | None = None) -> Tensor:
        """``[B, V]`` or ``[B, K, V]`` logits of the active rows -> the processor's float32
        scores (``log_softmax`` of them: the log-probabilities of the final distribution).

        ``rows[b]``: the history the LAST position follows (default ``histories()``); position
        ``j`` of ``K`` follows its first ``len - K + 1 + j`` tokens, so a verify forward's
        draft positions see the drafts before them. Built only for history processors."""
        proc = self.processor
        if not proc.needs_history:
            return proc.process_logits(None, logits)
        rows = self.histories() if rows is None else rows
        ids, mask = left_pad(rows, self.pad_token_id)  # [B, T]
        pads = (mask == 0).sum(-1)  # [B] left padding of each row
        prompt = torch.tensor([self.tracker.stats[r].prompt_tokens for r in self.tracker.active])
        return proc.process_logits(ids.to(logits.device), logits, pads + prompt, pads)

    def probs(self, logits: Tensor, rows: list[list[int]] | None = None) -> Tensor:
        """Processed probabilities (one-hot argmax when greedy) of ``scores``."""
        return self.processor.distribution(self.scores(logits, rows))

    def choose(self, logits: Tensor, rows: list[list[int]] | None = None) -> tuple[Tensor, Tensor | None]:
        """``[B, V]`` logits -> token ids ``[B]`` and, when log-probabilities were asked for
        (``tracker.logprobs_n``), the scores they were chosen from (else None)."""
        if self.tracker.logprobs_n is None:
            return self.sample(logits, rows), None
        scores = self.scores(logits, rows)
        return self.processor.sample(self.processor.distribution(scores), generator=self.generator), scores

    def sample(self, logits: Tensor, rows: list[list[int]] | None = None) -> Tensor:
        """``[B, V]`` logits -> sampled/argmax token ids ``[B]`` (``[B, K, V]`` -> ``[B, K]``)."""
        if self.processor.is_greedy and not self.processor.processors:  # plain argmax: nothing to apply
            return logits.argmax(dim=-1)
        return self.processor.sample(self.probs(logits, rows), generator=self.generator)


def drop_finished(
    tracker: RowTracker, finished: list[bool], states: list[ModelState], *tensors: Tensor,
    processor: LogitsPipeline | None = None,
) -> list[Tensor]:
    """Remove finished rows from the tracker, every state, every per-row tensor given and the
    ``processor``'s per-row settings. The forwards the states made so far are credited first,
    to the rows that took part."""
    for state in states:
        tracker.count_forwards(state)
    keep = tracker.drop_finished(finished)
    if keep is None or tracker.done:
        return list(tensors)
    for state in states:
        state.select_rows(keep)
    if processor is not None:
        processor.select_rows(keep.tolist())
    return [t.index_select(0, keep.to(t.device)) for t in tensors]
