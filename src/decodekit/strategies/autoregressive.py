"""Autoregressive decoding: greedy and sampling, one token per forward, batched.

The prompt is prefilled once; every step feeds only the new token through the KV cache
(``ModelState.extend``). Rows that finish leave the batch, so they stop costing compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from decodekit.strategies.base import DecodeRequest, drop_finished
from decodekit.strategies.options import Options, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoregressiveOptions(Options):
    """Greedy and sampling: only ``num_return_sequences`` (temperature / top_k / top_p and the
    other sampling knobs are ``generate``'s)."""

    num_return_sequences: int = option(1, "samples per prompt (sampling; the prompt is prefilled "
                                       "once and shared)", int, min=1)

    @property
    def samples_per_prompt(self) -> int:
        return self.num_return_sequences


@torch.inference_mode()
def decode(req: DecodeRequest, opts: AutoregressiveOptions | None = None):
    """Greedy or sampled decoding, depending on ``req.processor``."""
    tracker = req.tracker
    state, logits = req.prefill()
    logits = logits[:, -1]  # [B, V]
    while True:
        tokens, scores = req.choose(logits)  # [B], [B, V] | None
        finished = tracker.push(tokens[:, None], None if scores is None else scores[:, None])
        if req.debug and req.tokenizer is not None:
            log.info("step tokens: %s", [req.tokenizer.decode([t]) for t in tokens.tolist()])
        (tokens,) = drop_finished(tracker, finished, [state], tokens, processor=req.processor)
        if tracker.done:
            break
        logits = state.extend(tokens[:, None])[:, -1]  # [B, V]
    return tracker.result()

