"""The seed's functions, with their original signatures, as thin adapters over ``generate``.

Each adapter translates the seed's arguments (``max_gen_len``, ``eos_tokens_id``, one prompt
as a list of ids...) into one ``decodekit.generate`` call and shapes the result the way
the seed returned it. The decoding itself lives in ``decodekit.strategies``; this module
sits above the front door (it imports ``api``), so the strategies never call back up.

* ``autoregressive_generate`` -> strategy ``greedy`` / ``sample``
* ``beam_search_generate`` -> ``beam`` with the GNMT length penalty
* ``speculative_generate`` -> ``speculative`` (returns ids and the acceptance rate)
* ``ngram_assisted_speculative_generate`` -> ``ngram`` with the caller's storage
* ``iterative_generate`` -> ``refine`` (returns ``[B, T + L]`` full sequences)
* ``ExtendedInferenceSampler`` -> ``eis`` (the seed's class, ``generate`` returns ``[B, T + new]``)

The seed's processor classes live here too (``GreedyProcessor``, ``TopKProcessor``...,
``make_processor``): pipelines of temperature + one filter (``decodekit.processors``), so
``probs = proc(logits)`` and ``tokens = proc.sample(probs)`` work as they did.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from decodekit.api import generate, prepare_inputs
from decodekit.cache import ModelState
from decodekit.model_info import default_eos_pad, pad_id, vocab_size
from decodekit.ngram_storage import INgramStorage
from decodekit.processors import (
    HistoryProcessor,
    LogitsPipeline,
    Temperature,
    top_k_filtering,
    top_p_filtering,
)
from decodekit.strategies.beam import format_beam_trace
from decodekit.strategies.eis import EisOptions, RolloutScorer, format_eis_trace, rollout
from decodekit.validation import DecodeKitError, check_float, check_int, check_top_p

__all__ = [
    "LogitsProcessor",
    "GreedyProcessor",
    "MultinomialProcessor",
    "TopKProcessor",
    "NucleusProcessor",
    "TopKNucleusProcessor",
    "make_processor",
    "autoregressive_generate",
    "beam_search_generate",
    "speculative_generate",
    "ngram_assisted_speculative_generate",
    "iterative_generate",
    "ExtendedInferenceSampler",
]


# ---------------------------------------------------------------------------- seed processors
class _SeedFilter(HistoryProcessor):
    """The ``_process`` hook of a seed processor, as a pipeline step."""

    needs_history = False

    def __init__(self, owner: LogitsProcessor):
        self.owner = owner

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        return self.owner._process(logits)

    def __repr__(self) -> str:
        return f"{type(self.owner).__name__}._process"


class LogitsProcessor(LogitsPipeline):
    """Base of the seed processors: ``probs = processor(logits)``, ``tokens = processor.sample(probs)``.

    A pipeline of ``Temperature`` then the subclass's ``_process`` filter."""

    is_greedy = False

    def __init__(self, temperature: float = 1.0):
        check_float("temperature", temperature, min_value=0.0, min_inclusive=False)
        steps = [] if type(self).is_greedy else [Temperature(temperature), _SeedFilter(self)]
        super().__init__(steps, greedy=type(self).is_greedy, temperature=float(temperature))

    def _process(self, logits: Tensor) -> Tensor:
        return logits

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k not in ("processors", "is_greedy"))
        return f"{type(self).__name__}({fields})"


class GreedyProcessor(LogitsProcessor):
    """Argmax decoding. ``__call__`` returns the one-hot distribution of the argmax."""

    is_greedy = True

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature)


class MultinomialProcessor(LogitsProcessor):
    """Sample from the full softmax at ``temperature``."""


class TopKProcessor(LogitsProcessor):
    """Sample among the ``top_k`` most likely tokens."""

    def __init__(self, temperature: float, top_k: int):
        super().__init__(temperature)
        check_int("top_k", top_k, min_value=1)
        self.top_k = int(top_k)

    def _process(self, logits: Tensor) -> Tensor:
        return top_k_filtering(logits, self.top_k)


class NucleusProcessor(LogitsProcessor):
    """Sample from the smallest set of tokens whose probability reaches ``top_p``."""

    def __init__(self, temperature: float, top_p: float):
        super().__init__(temperature)
        check_top_p(top_p)
        self.top_p = float(top_p)

    def _process(self, logits: Tensor) -> Tensor:
        return top_p_filtering(logits, self.top_p)


class TopKNucleusProcessor(LogitsProcessor):
    """Top-k first, then top-p over what is left."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        super().__init__(temperature)
        check_int("top_k", top_k, min_value=1)
        check_top_p(top_p)
        self.top_k = int(top_k)
        self.top_p = float(top_p)

    def _process(self, logits: Tensor) -> Tensor:
        return top_p_filtering(top_k_filtering(logits, self.top_k), self.top_p)


def make_processor(
    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
) -> LogitsProcessor:
    """The processor for the usual sampling knobs; temperature 0 (or None) means greedy."""
    if temperature is not None:
        check_float("temperature", temperature, min_value=0.0)
    if top_k is not None:
        check_int("top_k", top_k, min_value=1)
    if top_p is not None:
        check_top_p(top_p)
    if temperature is None or temperature == 0:
        return GreedyProcessor()
    use_k = top_k is not None and top_k > 0
    use_p = top_p is not None and top_p < 1.0
    if use_k and use_p:
        return TopKNucleusProcessor(temperature, top_k, top_p)
    if use_k:
        return TopKProcessor(temperature, top_k)
    if use_p:
        return NucleusProcessor(temperature, top_p)
    return MultinomialProcessor(temperature)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- one prompt
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


def beam_search_generate(
    inputs: list[int],
    model,
    max_gen_len: int = 40,
    num_beams: int = 4,
    top_k: int = 3,
    min_length: float = 5.0,
    alpha: float = 1.2,
    eos_tokens_id: int | list[int] = 1,
    pad_token_id: int = 0,
    debug: bool = False,
    tokenizer=None,
) -> list[int]:
    """Seed API: GNMT-penalised beam search of one prompt; returns the best sequence's
    generated ids. Each beam expands only its ``top_k`` best tokens; ``min_length`` and
    ``alpha`` are the constants of the GNMT length penalty (see ``strategies/beam.py``)."""
    out = generate(
        model,
        [list(inputs)],
        strategy="beam",
        max_new_tokens=max_gen_len,
        num_beams=num_beams,
        expansion_top_k=top_k,
        length_style="gnmt",
        gnmt_min_length=min_length,
        length_penalty=alpha,
        eos_token_id=eos_tokens_id,
        pad_token_id=pad_token_id,
        tokenizer=tokenizer,
        debug=debug,
    )
    if debug:
        log.info("beam search trace:\n%s", format_beam_trace(out.debug, tokenizer))
    return out.sequences[0]


def speculative_generate(
    inputs: list[int],
    drafter,
    target,
    tokenizer=None,
    gamma: int = 5,
    use_egag: bool = False,
    gamma_min: int = 1,
    gamma_max: int | None = None,
    egag_ema_beta: float = 0.0,
    logits_processor=None,
    max_gen_len: int = 40,
    eos_tokens_id: int | list[int] = 1,
    pad_token_id: int = 0,
    use_cache: bool = False,
    skip_sample_adjustment: bool = False,
    first_target: bool = True,
    debug: bool = False,
) -> tuple[list[int], float]:
    """Seed API: one prompt (token ids) -> (generated ids, acceptance rate).

    ``logits_processor`` defaults to ``GreedyProcessor()``; ``gamma`` drafts every step
    (``draft_policy="fixed"``, as the seed did; ``generate`` defaults to ``"cost"``);
    ``use_egag`` selects the EGAG policy. The acceptance rate is accepted / drafted (0.0 when nothing was drafted).
    """
    out = generate(
        target, [list(inputs)], strategy="speculative", drafter=drafter, tokenizer=tokenizer,
        gamma=gamma, draft_policy="egag" if use_egag else "fixed", gamma_min=gamma_min,
        gamma_max=gamma_max, egag_ema_beta=egag_ema_beta,
        logits_processor=logits_processor if logits_processor is not None else GreedyProcessor(),
        max_new_tokens=max_gen_len, eos_token_id=eos_tokens_id, pad_token_id=pad_token_id,
        use_cache=use_cache, skip_sample_adjustment=skip_sample_adjustment, first_target=first_target,
        debug=debug,
    )
    return out.sequences[0], out.stats[0].acceptance_rate


def ngram_assisted_speculative_generate(
    inputs: list[int],
    ngramstorage: INgramStorage,
    target,
    tokenizer=None,
    gamma: int = 5,
    filler_top_k: int = 3,
    logits_processor=None,
    max_gen_len: int = 40,
    eos_tokens_id: int | list[int] = 1,
    pad_token_id: int = 0,
    use_cache: bool = False,
    first_target: bool = True,
    stop_if_unknown: bool = False,
    debug: bool = False,
) -> tuple[list[int], float]:
    """Seed API: one prompt (token ids) -> (generated ids, acceptance rate).

    ``ngramstorage`` is initialised with the prompt and updated as tokens are verified
    (it keeps its counts afterwards). ``gamma`` drafts every step (``draft_policy="fixed"``). ``logits_processor`` defaults to ``GreedyProcessor()``.
    The acceptance rate is accepted / drafted (0.0 when nothing was drafted).
    """
    if not isinstance(ngramstorage, INgramStorage):
        raise DecodeKitError(f"ngramstorage must be an INgramStorage, got {type(ngramstorage).__name__}")
    out = generate(
        target, [list(inputs)], strategy="ngram", storage=ngramstorage, ngram_n=ngramstorage.n,
        tokenizer=tokenizer, gamma=gamma, draft_policy="fixed", filler_top_k=filler_top_k,
        logits_processor=logits_processor if logits_processor is not None else GreedyProcessor(),
        max_new_tokens=max_gen_len, eos_token_id=eos_tokens_id, pad_token_id=pad_token_id,
        use_cache=use_cache, first_target=first_target, stop_if_unknown=stop_if_unknown, debug=debug,
    )
    return out.sequences[0], out.stats[0].acceptance_rate


# ---------------------------------------------------------------------------- batches
def _append_padded(ids: Tensor, sequences: list[list[int]], pad: int) -> Tensor:
    """``ids [B, T]`` + each row's new tokens, right-padded with ``pad`` -> ``[B, T + L]``."""
    width = max(len(s) for s in sequences)
    new = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
    for b, seq in enumerate(sequences):
        new[b, : len(seq)] = torch.tensor(seq, dtype=ids.dtype)
    return torch.cat([ids, new], dim=1)


def iterative_generate(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                       max_new_tokens: int = 1024, add_eos_length: int = 127,
                       refine_iter: int | str = 2, max_length: int = 8192,
                       eos_token_id: int | list[int] | None = None,
                       pad_token_id: int | None = None) -> Tensor:
    """Seed API: iterative block refinement of a batch of prompts (greedy).

    ``input_ids``: ``[B, T]`` (or ``[T]``), left padded with ``attention_mask``. Returns what
    the seed returns: the full sequences ``[B, T + L]``, each row its (left-padded) prompt
    followed by its generated tokens, cut after the row's first generated EOS (kept) or at
    ``max_new_tokens`` / ``max_length`` total tokens, and right-padded with ``pad_token_id``
    (``L`` = the longest row's new tokens). See ``decode_refine`` for the algorithm;
    ``refine_iter="converge"`` gives Jacobi decoding (= greedy). Lossy otherwise on a plain
    causal LM. For stats and traces use ``decodekit.generate(..., strategy="refine")``.
    """
    pad_token_id = pad_id(model, pad_token_id)
    ids, mask = prepare_inputs(input_ids, attention_mask, pad_token_id)
    if isinstance(max_new_tokens, int) and isinstance(max_length, int):  # the seed stops at max_length
        max_new_tokens = max(1, min(max_new_tokens, max_length - int(mask.sum(-1).max())))
    out = generate(model, ids, mask, strategy="refine", max_new_tokens=max_new_tokens,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   add_eos_length=add_eos_length, refine_iter=refine_iter, max_length=max_length)
    return _append_padded(ids.cpu().long(), out.sequences, pad_token_id)


# ---------------------------------------------------------------------------- the seed's class
class ExtendedInferenceSampler:
    """The seed's EIS interface, a thin wrapper over strategy ``eis`` (same code, same results).

    ``generate(input_ids, generation_config)`` returns ``[B, T + new]`` token ids (finished
    rows padded with the pad id); ``last_output`` holds the full ``GenerationOutput``
    (stats, and the per-step trace when ``debug=True``).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        lookahead_steps: int = 3,
        discount_factor: float = 0.9,
        top_k: int = 5,
        temperature: float = 1.0,
        top_p: float = 1.0,
        rollout_mode: str = "greedy",
        use_cache: bool = True,
        debug: bool = False,
    ):
        EisOptions(lookahead_steps, discount_factor, top_k, temperature, top_p, rollout_mode).scoring(vocab_size(model))
        self.model = model
        self.tokenizer = tokenizer
        self.lookahead_steps = lookahead_steps
        self.discount_factor = discount_factor
        self.top_k = top_k
        self.temperature = temperature
        self.top_p = top_p
        self.rollout_mode = rollout_mode
        self.use_cache = use_cache
        self.debug = debug
        self.last_output = None

    def _options(self) -> dict:
        return dict(
            lookahead_steps=self.lookahead_steps, discount_factor=self.discount_factor, top_k=self.top_k,
            temperature=self.temperature, top_p=self.top_p, rollout_mode=self.rollout_mode,
        )

    def _scorer(self) -> RolloutScorer:
        temperature, top_p = EisOptions(**self._options()).scoring(vocab_size(self.model))
        eos = _eos_ids(None, self.model)
        return RolloutScorer(temperature, top_p, self.rollout_mode == "greedy", None, eos)

    @torch.inference_mode()
    def _rollout_batch(self, candidate_ids: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """``candidate_ids [N, T]`` (context + candidate, left padded; ``model_kwargs`` may
        hold its ``attention_mask``) -> ``[N]`` discounted rollout sums
        ``sum_{t=1..L} gamma^t log p(c_t | x, c, c_<t)`` (``log p(c|x)`` not included)."""
        mask = (model_kwargs or {}).get("attention_mask")
        state, logits = ModelState.prefill(self.model, candidate_ids, mask, use_cache=self.use_cache)
        scorer = self._scorer()
        alive = ~scorer.is_eos(state.ids[:, -1])
        future, _ = rollout(state, logits[:, -1], alive, self.lookahead_steps, self.discount_factor, scorer)
        return future

    def generate(self, input_ids: Tensor, generation_config=None, attention_mask: Tensor | None = None, **model_kwargs):
        """``input_ids [B, T]`` (or ``[T]``) -> ``[B, T + new]``; ``generation_config`` (a
        transformers ``GenerationConfig``) supplies ``max_new_tokens`` and ``eos_token_id``."""
        attention_mask = model_kwargs.pop("attention_mask", attention_mask)
        if model_kwargs:
            raise DecodeKitError(f"unsupported model kwargs for EIS: {', '.join(model_kwargs)}")
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        eos = _eos_ids(generation_config, self.model)
        pad = _pad_id(generation_config, self.tokenizer, eos)
        out = generate(
            self.model, ids, attention_mask, strategy="eis", max_new_tokens=_max_new_tokens(generation_config, ids),
            eos_token_id=eos, pad_token_id=pad, tokenizer=self.tokenizer, use_cache=self.use_cache,
            debug=self.debug, **self._options(),
        )
        self.last_output = out
        if self.debug:
            log.info("EIS trace:\n%s", format_eis_trace(out.debug, self.tokenizer))
        return _append_padded(ids, out.sequences, pad)


def _eos_ids(generation_config, model) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = default_eos_pad(model)[0]
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_id(generation_config, tokenizer, eos: list[int]) -> int:
    for pad in (getattr(generation_config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if pad is not None:
            return int(pad)
    return eos[0] if eos else 0


def _max_new_tokens(generation_config, ids: Tensor) -> int:
    """``max_new_tokens``, else ``max_length - T``, else transformers' default of 20 tokens."""
    if generation_config is None:
        return 20
    if generation_config.max_new_tokens is not None:
        return generation_config.max_new_tokens
    if getattr(generation_config, "max_length", None) is not None:
        return max(1, generation_config.max_length - ids.shape[1])
    return 20
