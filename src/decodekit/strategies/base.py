"""What every strategy receives: one validated, batched decoding request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from decodekit.cache import ModelState
from decodekit.outputs import RowTracker
from decodekit.processors import LogitsProcessor


@dataclass
class DecodeRequest:
    model: Any  # a transformers causal LM
    input_ids: Tensor  # [B, T] left padded
    attention_mask: Tensor  # [B, T]
    processor: LogitsProcessor
    tracker: RowTracker
    max_new_tokens: int
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    generator: torch.Generator | None = None
    tokenizer: Any = None
    use_cache: bool = True
    debug: bool = False

    def prompt_rows(self) -> list[list[int]]:
        """The real prompt tokens of each row (left padding removed)."""
        return [row[m.bool()].tolist() for row, m in zip(self.input_ids.cpu(), self.attention_mask.cpu())]

    def sample(self, logits: Tensor) -> Tensor:
        """``[B, V]`` (or ``[B, T, V]``) logits -> sampled/argmax token ids ``[B]`` (``[B, T]``)."""
        if self.processor.is_greedy:
            return logits.argmax(dim=-1)
        return self.processor.sample(self.processor(logits), generator=self.generator)


def drop_finished(
    tracker: RowTracker, finished: list[bool], states: list[ModelState], *tensors: Tensor
) -> list[Tensor]:
    """Remove finished rows from the tracker, every state and every per-row tensor given.
    The forwards the states made so far are credited first, to the rows that took part."""
    for state in states:
        tracker.count_forwards(state)
    keep = tracker.drop_finished(finished)
    if keep is None or tracker.done:
        return list(tensors)
    for state in states:
        state.select_rows(keep)
    return [t.index_select(0, keep.to(t.device)) for t in tensors]
