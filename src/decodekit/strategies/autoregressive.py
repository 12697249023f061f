"""Autoregressive decoding: greedy and sampling, one token per forward, batched.

The prompt is prefilled once; every step feeds only the new token through the KV cache
(``ModelState.extend``). Rows that finish leave the batch, so they stop costing compute.
"""

from __future__ import annotations

import logging

import torch

from decodekit.cache import ModelState
from decodekit.processors import GreedyProcessor, LogitsProcessor
from decodekit.strategies.base import DecodeRequest, drop_finished

log = logging.getLogger(__name__)


@torch.inference_mode()
def decode(req: DecodeRequest):
    """Greedy or sampled decoding, depending on ``req.processor``."""
    tracker = req.tracker
    state, logits = ModelState.prefill(req.model, req.input_ids, req.attention_mask, use_cache=req.use_cache)
    tracker.count_forward()
    logits = logits[:, -1]  # [B, V]
    while True:
        tokens = req.sample(logits)  # [B]
        finished = tracker.push(tokens[:, None])
        if req.debug and req.tokenizer is not None:
            log.info("step tokens: %s", [req.tokenizer.decode([t]) for t in tokens.tolist()])
        (tokens,) = drop_finished(tracker, finished, [state], tokens)
        if tracker.done:
            break
        logits = state.extend(tokens[:, None])[:, -1]  # [B, V]
        tracker.count_forward()
    return tracker.result()


def autoregressive_generate(
    inputs: list[int],
    model,
    max_gen_len: int = 40,
    logits_processor: LogitsProcessor = GreedyProcessor(),
    eos_tokens_id: int | list[int] = 1,
    pad_token_id: int = 0,
    use_cache: bool = False,
    debug: bool = False,
) -> list[int]:
    """Seed API: decode one prompt (a list of token ids); returns the generated ids.

    ``use_cache=False`` re-runs the whole sequence every step (slow, for teaching);
    ``use_cache=True`` feeds one token per step through the KV cache. Both give the same
    tokens.
    """
    from decodekit.api import generate

    out = generate(
        model,
        [list(inputs)],
        strategy="greedy" if logits_processor.is_greedy else "sample",
        max_new_tokens=max_gen_len,
        logits_processor=logits_processor,
        eos_token_id=eos_tokens_id,
        pad_token_id=pad_token_id,
        use_cache=use_cache,
        debug=debug,
    )
    return out.sequences[0]
