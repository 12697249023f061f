"""Autoregressive decoding: greedy and sampling, one token per forward, batched.

The prompt is prefilled once; every step feeds only the new token through the KV cache
(``ModelState.extend``). Rows that finish leave the batch, so they stop costing compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from decodekit.cache import ModelState
from decodekit.strategies.base import DecodeRequest, drop_finished
from decodekit.strategies.options import Options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoregressiveOptions(Options):
    """Greedy and sampling take no options of their own (temperature / top_k / top_p and
    the other sampling knobs are ``generate``'s)."""


@torch.inference_mode()
def decode(req: DecodeRequest, opts: AutoregressiveOptions | None = None):
    """Greedy or sampled decoding, depending on ``req.processor``."""
    tracker = req.tracker
    state, logits = ModelState.prefill(req.model, req.input_ids, req.attention_mask, use_cache=req.use_cache)
    logits = logits[:, -1]  # [B, V]
    while True:
        tokens, scores = req.choose(logits)  # [B], [B, V] | None
        finished = tracker.push(tokens[:, None], None if scores is None else scores[:, None])
        if req.debug and req.tokenizer is not None:
            log.info("step tokens: %s", [req.tokenizer.decode([t]) for t in tokens.tolist()])
        (tokens,) = drop_finished(tracker, finished, [state], tokens)
        if tracker.done:
            break
        logits = state.extend(tokens[:, None])[:, -1]  # [B, V]
    return tracker.result()

