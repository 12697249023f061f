"""The front door: ``generate`` (every strategy, batched) and ``generate_super``.

``generate(model, input_ids, attention_mask=None, *, strategy="greedy", ...)``:

* ``strategy`` is one of ``decodekit.STRATEGIES``; its options (``num_beams``, ``drafter``,
  ``gamma``...) go in ``**options`` and are checked by the strategy's ``Options`` class.
* Sampling knobs: ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``min_p``,
  ``typical_p``, or a ``logits_processor`` (decodekit's, or transformers' ``LogitsProcessor``
  / ``LogitsProcessorList``). History processors, with transformers' names, also go in
  ``**options``: ``repetition_penalty``, ``presence_penalty`` / ``frequency_penalty`` (OpenAI
  semantics), ``no_repeat_ngram_size``, ``logit_bias`` ({token id: bias}), ``bad_words_ids``,
  ``suppress_tokens``, ``min_new_tokens``, ``ignore_eos``. They stay exact under every
  speculative strategy. ``seed`` makes sampling reproducible; ``num_return_sequences=n``
  samples n sequences per prompt from one shared prefill.
* Structured output (needs ``tokenizer``), one of: ``json_schema`` (a dict or JSON text),
  ``json_object=True``, ``regex``, ``grammar`` (Lark or GBNF text) or ``choices`` (strings):
  a ``decodekit.constraints.GrammarConstraint`` masks what it forbids, exact under every
  strategy but EIS and refine (refused). A list of one entry per prompt (None: unconstrained),
  ``json_schema=[schema, None]``, gives each prompt its own (greedy, sample and drafting).
* ``logprobs=N`` (0..20): each generated token's log-probability under the final processed
  distribution (under speculation, the target's, never the drafter's) and the ``N`` most
  likely alternatives, in ``output.logprobs``.
* ``generation_config``: a transformers ``GenerationConfig`` (its sampling, penalty, beam and
  length fields map onto the options above; keyword arguments win; a field decodekit cannot
  honour is an error: ``decodekit.params``).
* ``eos_token_id`` / ``pad_token_id`` default to the model's generation config;
  ``stop_strings`` is a string or a list of non-empty strings (needs ``tokenizer``);
  ``streamer`` is ``callback(row, new_token_ids)`` or a transformers streamer.
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import Tensor

from decodekit.cache import left_pad
from decodekit.constraints import (
    GrammarConstraint,
    RowConstraints,
    constraint_stats,
)
from decodekit.model_info import context_length, default_eos_pad, pad_id, vocab_size
from decodekit.outputs import GenerationOutput, RowTracker
from decodekit.params import GenerateParams
from decodekit.processors import (
    LogitsPipeline,
    check_processor_options,
    is_set,
    make_pipeline,
    sampling_knobs,
)
from decodekit.strategies import Strategy
from decodekit.strategies.base import DecodeRequest
from decodekit.validation import (
    DecodeKitError,
    check_int,
    check_token_ids,
    normalize_eos,
)

__all__ = ["generate", "generate_super", "prepare_inputs", "build_request"]


_SHAPES = "shape [T] or [B, T] (a tensor, a list of token ids, or a list of lists of them)"


def _tensor_inputs(input_ids: Tensor, attention_mask) -> tuple[Tensor, Tensor]:
    """``[T]``/``[B, T]`` ids and a mask of the same shape (ones when None) -> ``[B, T]`` both."""
    if input_ids.dim() not in (1, 2):
        raise DecodeKitError(f"input_ids must have {_SHAPES}; got a tensor of shape {list(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise DecodeKitError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids  # [B, T]
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    mask = torch.as_tensor(attention_mask)
    if mask.shape not in (input_ids.shape, ids.shape):
        raise DecodeKitError(f"attention_mask has shape {list(mask.shape)}; it must match the shape "
                             f"of input_ids, {list(input_ids.shape)}")
    mask = mask.reshape(ids.shape)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DecodeKitError("attention_mask must hold only 0 (padding) and 1 (token)")
    return ids, mask.long()


def _token(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(value)
    return int(value)


def _list_rows(input_ids) -> list[list[int]]:
    """A list of token ids (one prompt) or a list of such lists -> rows of ints."""
    try:
        seq = list(input_ids)
        rows = [seq] if seq and isinstance(seq[0], numbers.Integral) else seq
        return [[_token(t) for t in (row.tolist() if isinstance(row, Tensor) else row)] for row in rows]
    except TypeError:
        raise DecodeKitError(f"input_ids must have {_SHAPES}; got {_describe(input_ids)}") from None


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prepare_inputs(
    input_ids, attention_mask: Tensor | None, pad_token_id: int, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Accept ``[T]``/``[B, T]`` tensors or lists of ids; return left-padded ``ids, mask``.

    A right-padded batch (mask ending in 0) is re-aligned to the left, which decoding
    needs. Every row must hold at least one real token; with ``vocab_size``, every token
    and ``pad_token_id`` must be in the vocabulary.
    """
    check_int("pad_token_id", pad_token_id)
    check_token_ids("pad_token_id", [pad_token_id], vocab_size)
    if attention_mask is not None and not isinstance(input_ids, Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):
            raise DecodeKitError("with an attention_mask, input_ids must be rectangular [B, T] "
                                 f"(rows of equal length); got {_describe(input_ids)}") from None
    if isinstance(input_ids, Tensor):
        ids, mask = _tensor_inputs(input_ids, attention_mask)  # [B, T] both
        rows = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
        needs_realign = ids.shape[1] == 0 or bool((mask[:, -1] == 0).any()) or bool(
            (mask[:, :-1] > mask[:, 1:]).any()
        )
        ids = ids.masked_fill(mask == 0, pad_token_id)  # padding never reaches the embedding
    else:
        rows = _list_rows(input_ids)
        needs_realign, ids, mask = True, None, None
    if not rows:
        raise DecodeKitError("input_ids must hold at least one prompt")
    for b, row in enumerate(rows):
        if len(row) == 0:
            raise DecodeKitError(f"prompt {b} is empty: every prompt needs at least one token")
    check_token_ids("input_ids", [tok for row in rows for tok in row], vocab_size)
    if needs_realign:
        ids, mask = left_pad(rows, pad_token_id)
    return ids, mask


def _check_room(prompt_lengths: list[int], max_new_tokens: int, context: int | None) -> None:
    """The longest prompt plus ``max_new_tokens`` must fit in the model's context."""
    if context is None:
        return
    longest = max(prompt_lengths)
    if longest >= context:
        raise DecodeKitError(
            f"prompt is {longest} tokens; the model's context is {context} tokens "
            "(prompt length must be below it)"
        )
    if longest + max_new_tokens > context:
        raise DecodeKitError(
            f"max_new_tokens={max_new_tokens} does not fit: the prompt is {longest} tokens and the "
            f"model's context is {context}, so at most {context - longest} new tokens fit "
            f"(prompt length + max_new_tokens must be <= {context})"
        )


def _make_processor(strategy: Strategy, logits_processor, knobs: dict, eos_ids: list[int],
                    vocab: int | None) -> LogitsPipeline:
    """The pipeline a strategy decodes with: the history processors of ``knobs``
    (penalties, biases...), the user's ``logits_processor``, then temperature and the filters.
    Sampling knobs mean what the strategy's ``sampling`` mode says (``Strategy``)."""
    check_processor_options(knobs, vocab)  # every knob, even one this strategy will not use
    sampling = {k: knobs[k] for k in sampling_knobs() if knobs.get(k) is not None}
    history = {k: v for k, v in knobs.items() if k not in sampling and is_set(v)}
    if strategy.sampling == "own":  # EIS: temperature/top_k/top_p are its options
        if history or logits_processor is not None or set(sampling) - {"temperature", "top_k", "top_p"}:
            given = ", ".join([*history, *(set(sampling) - {"temperature", "top_k", "top_p"})]) or "logits_processor"
            raise DecodeKitError(f"strategy {strategy.name!r} scores candidates with its own temperature/"
                                 f"top_k/top_p; it does not take {given}")
        return LogitsPipeline(greedy=True)  # argmax: a one-hot distribution
    if logits_processor is not None and sampling:
        raise DecodeKitError("pass either logits_processor or temperature/top_k/top_p/min_p/typical_p, not both")
    temperature = sampling.get("temperature")
    if strategy.sampling == "none" or (strategy.sampling == "optional" and not sampling):
        if temperature not in (None, 0):
            hint = "; use strategy='sample'" if strategy.name == "greedy" else ""
            raise DecodeKitError(
                f"strategy {strategy.name!r} is greedy only: it takes no temperature/top_k/top_p{hint}"
            )
        sampling = {}
    elif strategy.sampling == "required" and logits_processor is None:
        if temperature == 0:
            raise DecodeKitError("temperature must be > 0 for strategy 'sample' (0 means greedy)")
        sampling["temperature"] = 1.0 if temperature is None else temperature
    return make_pipeline(**sampling, **history, logits_processor=logits_processor, eos_token_id=eos_ids,
                         vocab_size=vocab)


PER_ROW_CONSTRAINTS = ("greedy", "sample", "speculative", "prompt_lookup", "ngram")  # follow rows that leave


def _add_constraint(strategy: Strategy, processor: LogitsPipeline, spec, knobs: dict, tokenizer,
                    eos_ids: list[int], vocab: int | None, prompts: int, shared: Tensor | None) -> None:
    """The constraint goes first in the pipeline: what it forbids stays -inf through the
    penalties, temperature and filters, so it is part of the target distribution. ``spec``:
    one ``ConstraintSpec`` for every row, or a list of one per prompt (None: unconstrained)."""
    per_prompt = isinstance(spec, list)
    first = next((s for s in spec if s is not None), None) if per_prompt else spec
    if first is None:
        return
    for knob in ("min_new_tokens", "ignore_eos"):
        if knobs.get(knob):  # where the grammar is complete, EOS is the only token left
            raise DecodeKitError(f"{knob} cannot be combined with {first.name}: the grammar decides where "
                                 "the output ends")
    if not strategy.constrained:
        raise DecodeKitError(f"strategy {strategy.name!r} does not take {first.name}: it does not decode "
                             "token by token (use greedy, sample, beam or a drafting strategy)")
    if not per_prompt:
        processor.processors.insert(0, GrammarConstraint(spec, tokenizer, eos_ids, vocab))
        return
    if strategy.name not in PER_ROW_CONSTRAINTS:
        raise DecodeKitError(f"per-prompt {first.name} runs with strategies {', '.join(PER_ROW_CONSTRAINTS)}; "
                             f"give strategy {strategy.name!r} one constraint for every prompt")
    if len(spec) != prompts:
        raise DecodeKitError(f"per-prompt {first.name} has {len(spec)} entries for {prompts} prompts")
    built: dict = {}  # one constraint (one matcher pool) per distinct spec
    for s in spec:
        if s is not None and s not in built:
            built[s] = GrammarConstraint(s, tokenizer, eos_ids, vocab)
    rows = [built.get(s) if s is not None else None for s in spec]  # per prompt
    if shared is not None:  # num_return_sequences: each copy follows its prompt's constraint
        rows = [rows[i] for i in shared.tolist()]
    processor.processors.insert(0, RowConstraints(rows))


def _share_prompts(ids: Tensor, mask: Tensor, n: int, processor: LogitsPipeline):
    """``n`` samples per prompt: each row repeated ``n`` times (prompt-major), with the
    prompt number of every copy (``DecodeRequest.shared``: prefilled once, then forked)."""
    if n == 1:
        return ids, mask, None
    if processor.is_greedy:
        raise DecodeKitError(f"num_return_sequences={n} needs sampling (temperature > 0): greedy "
                             "decoding would return the same sequence n times")
    shared = torch.arange(ids.shape[0]).repeat_interleave(n)  # [B * n]
    return ids.index_select(0, shared), mask.index_select(0, shared), shared


def _generator(seed: int | None, model) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=model.device).manual_seed(seed)


def _inputs(model, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens):
    """Checked, left-padded ``ids, mask [B, T]``, the EOS ids and the pad id."""
    default_eos = default_eos_pad(model)[0]
    eos_ids = normalize_eos(default_eos if eos_token_id is None else eos_token_id, vocab_size(model))
    pad_token_id = pad_id(model, pad_token_id)
    ids, mask = prepare_inputs(input_ids, attention_mask, pad_token_id, vocab_size(model))
    _check_room(mask.sum(-1).tolist(), max_new_tokens, context_length(model))
    return ids, mask, eos_ids, pad_token_id


def generate(model, input_ids, attention_mask: Tensor | None = None, **kwargs) -> GenerationOutput:
    """Decode a batch of prompts with one strategy (see the module docstring for every knob).

    ``input_ids``: ``[B, T]`` / ``[T]`` tensor (with ``attention_mask``) or lists of token ids.
    ``**kwargs``: ``GenerateParams.from_kwargs``'s (``strategy``, ``max_new_tokens``, the
    sampling knobs, ``generation_config``...), the strategy's options (``num_beams``,
    ``drafter``, ``gamma``...) and the history processors (``repetition_penalty``...).
    ``logprobs=N`` fills ``output.logprobs``. Returns a ``GenerationOutput`` with the new
    tokens and per-request stats.
    """
    chosen, opts, request = build_request(model, input_ids, attention_mask, **kwargs)
    was_training = model.training
    model.eval()
    try:
        out = chosen.decode(request, opts)
    finally:
        model.train(was_training)
    constraint_stats(request.processor, out.sequences, out.stats)
    return out


def build_request(model, input_ids, attention_mask: Tensor | None = None,
                  **kwargs) -> tuple[Strategy, object, DecodeRequest]:
    """Everything ``generate`` checks and builds before decoding, without a forward: the
    strategy record, its validated options and the ``DecodeRequest`` (same arguments as
    ``generate``; bad input raises ``DecodeKitError``). ``decodekit.serve`` validates and
    starts requests with it."""
    params = GenerateParams.from_kwargs(**kwargs)  # every check that needs no model
    return params.strategy, params.options, request_from_params(model, input_ids, attention_mask, params)


# help() and IDEs show the keyword arguments generate and build_request take: from_kwargs's
_KEYWORDS = [p for p in inspect.signature(GenerateParams.from_kwargs).parameters.values() if p.name != "cls"]
for _front in (generate, build_request):
    _positional = list(inspect.signature(_front).parameters.values())[:3]
    _front.__signature__ = inspect.Signature(_positional + _KEYWORDS,
                                             return_annotation=_front.__annotations__["return"])


def request_from_params(model, input_ids, attention_mask: Tensor | None, params: GenerateParams) -> DecodeRequest:
    """The ``DecodeRequest`` of checked ``params`` for ``model`` and its prompts."""
    if params.stop_strings and params.tokenizer is None:
        raise DecodeKitError("stop_strings needs tokenizer=... to decode the text")
    ids, mask, eos_ids, pad_token_id = _inputs(model, input_ids, attention_mask, params.eos_token_id,
                                                params.pad_token_id, params.max_new_tokens)
    vocab = vocab_size(model)
    processor = _make_processor(params.strategy, params.logits_processor, params.knobs, eos_ids, vocab)
    prompts = ids.shape[0]
    ids, mask, shared = _share_prompts(ids, mask, params.options.samples_per_prompt, processor)
    _add_constraint(params.strategy, processor, params.constraint, params.knobs, params.tokenizer, eos_ids,
                    vocab, prompts, shared)
    tracker = RowTracker(mask.sum(-1).tolist(), max_new_tokens=params.max_new_tokens, eos_token_ids=eos_ids,
                         stop_strings=list(params.stop_strings), tokenizer=params.tokenizer,
                         streamer=params.streamer)
    tracker.logprobs_n = params.logprobs
    return DecodeRequest(
        model=model, input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
        processor=processor, tracker=tracker, max_new_tokens=params.max_new_tokens, eos_token_ids=eos_ids,
        pad_token_id=pad_token_id, generator=_generator(params.seed, model), tokenizer=params.tokenizer,
        use_cache=params.use_cache, debug=params.debug, shared=shared,
    )


def generate_super(
    model,
    input_ids,
    do_sample: bool = False,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int = 64,
    assistant_model=None,
    **kwargs,
) -> GenerationOutput:
    """One call for the classic strategies, routed like transformers' ``generate``.

    * ``num_beams > 1`` -> beam search (``do_sample`` must be False),
    * ``assistant_model`` -> speculative (assisted) decoding with that drafter,
    * ``do_sample`` and ``temperature > 0`` -> sampling with temperature/top-k/top-p,
    * otherwise (the default, or ``temperature == 0``) -> greedy. Nothing samples unless
      asked to: the original's defaults silently sampled.
    """
    check_int("num_beams", num_beams, min_value=1)
    sampling = bool(do_sample) and temperature != 0
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p) if sampling else {}
    if num_beams > 1:
        if sampling:
            raise DecodeKitError("beam search with do_sample=True is not supported; set do_sample=False")
        return generate(model, input_ids, strategy="beam", num_beams=num_beams,
                        max_new_tokens=max_new_tokens, **kwargs)
    if assistant_model is not None:
        return generate(model, input_ids, strategy="speculative", drafter=assistant_model,
                        max_new_tokens=max_new_tokens, **knobs, **kwargs)
    strategy = "sample" if sampling else "greedy"
    return generate(model, input_ids, strategy=strategy, max_new_tokens=max_new_tokens, **knobs, **kwargs)
