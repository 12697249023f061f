"""``generate``'s parameters, checked once and without a model: ``GenerateParams``.

``GenerateParams.from_kwargs(**kwargs)`` takes what ``decodekit.generate`` takes (besides the
model and the prompts) and returns the strategy record, its typed options, the processor
knobs (``processors.KNOBS``) and the constraint, or raises a one-line ``DecodeKitError``
naming the parameter. ``generate``, ``build_request``, the CLI, Ray's driver and the server all
call it, so a knob is validated in one place and keeps its name from the flag to the loop.

A transformers ``GenerationConfig`` (``generation_config=``) maps onto the same records:
``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``,
``repetition_penalty``, ``no_repeat_ngram_size``, ``num_beams``, ``length_penalty``,
``early_stopping``, ``max_new_tokens``, ``min_new_tokens``, ``eos_token_id``, ``pad_token_id``,
``prompt_lookup_num_tokens``, ``num_return_sequences``; keyword arguments win over the config. A
field it sets that decodekit cannot honour is an error, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from decodekit.constraints import pop_constraint
from decodekit.processors import KNOBS, check_min_new_tokens, check_processor_options
from decodekit.specs import json_schema
from decodekit.strategies import STRATEGIES, Strategy, build_options, get_strategy
from decodekit.strategies.options import Options
from decodekit.validation import MAX_SEED, DecodeKitError, check_int, check_stop_strings

__all__ = ["GenerateParams", "from_generation_config", "decoding_schema", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
# GenerationConfig fields that never change what is decoded here
_IGNORED_FIELDS = {"transformers_version", "_from_model_config", "bos_token_id", "decoder_start_token_id",
                   "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                   "output_hidden_states", "use_cache", "cache_implementation"}


@dataclass(frozen=True)
class GenerateParams:
    """Everything ``generate`` decides before it sees the model."""

    strategy: Strategy
    options: Options  # the strategy's typed options
    knobs: dict  # processor knobs that are set (token ids checked against the vocabulary later)
    constraint: Any  # ConstraintSpec, a list of one per prompt, or None
    max_new_tokens: int = 64
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    logits_processor: Callable | None = None
    tokenizer: Any = None
    streamer: Callable | None = None
    use_cache: bool = True
    debug: bool = False

    @classmethod
    def from_kwargs(cls, *, strategy: str = "greedy", max_new_tokens: int = 64,
                    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                    logits_processor: Callable | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_strings: str | Sequence[str] | None = None, logprobs: int | None = None,
                    tokenizer=None, streamer=None, use_cache: bool = True, debug: bool = False,
                    generation_config=None, **options) -> GenerateParams:
        """Check ``generate``'s keyword arguments (``**options``: the strategy's options, the
        processor knobs and the constraint keywords)."""
        given = dict(options, temperature=temperature, top_k=top_k, top_p=top_p)
        named = dict(strategy=strategy, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id)
        if generation_config is not None:
            given, named = _merge_config(generation_config, given, named)
        return cls._build(given, named, dict(
            seed=seed, stop_strings=stop_strings, logprobs=logprobs, logits_processor=logits_processor,
            tokenizer=tokenizer, streamer=streamer, use_cache=use_cache, debug=debug))

    @classmethod
    def _build(cls, given: dict, named: dict, rest: dict) -> GenerateParams:
        chosen = get_strategy(named["strategy"])
        constraint = pop_constraint(given)
        knobs = {k: v for k, v in given.items() if k in KNOBS and v is not None}
        sampling = {k: given.get(k) for k in ("temperature", "top_k", "top_p")}
        opts = build_options(chosen.name, {k: v for k, v in given.items() if k not in KNOBS}, sampling)
        check_processor_options(knobs)
        check_int("max_new_tokens", named["max_new_tokens"], min_value=1)
        check_min_new_tokens(knobs.get("min_new_tokens"), named["max_new_tokens"])
        if rest["seed"] is not None:
            check_int("seed", rest["seed"], min_value=0, max_value=MAX_SEED)
        _check_logprobs(chosen, rest["logprobs"])
        stops = tuple(check_stop_strings(rest["stop_strings"]))  # they need a tokenizer: request_from_params
        return cls(chosen, opts, knobs, constraint, named["max_new_tokens"], rest["seed"], stops,
                   rest["logprobs"], named["eos_token_id"], named["pad_token_id"], rest["logits_processor"],
                   rest["tokenizer"], rest["streamer"], rest["use_cache"], rest["debug"])


def _check_logprobs(strategy: Strategy, logprobs) -> None:
    if logprobs is None:
        return
    check_int("logprobs", logprobs, min_value=0, max_value=MAX_LOGPROBS)
    if not strategy.logprobs:
        raise DecodeKitError(f"logprobs is not available with strategy {strategy.name!r}")


# ---------------------------------------------------------------------------- GenerationConfig
def from_generation_config(config) -> tuple[dict, dict]:
    """A transformers ``GenerationConfig`` -> ``(options and knobs, named parameters)`` for the
    fields it sets (those that differ from ``GenerationConfig()``'s defaults)."""
    fields = {k: v for k, v in config.to_diff_dict().items() if k not in _IGNORED_FIELDS}
    sample = bool(fields.pop("do_sample", False))
    beams = fields.pop("num_beams", 1)
    options, named = {}, {}
    for name in ("max_new_tokens", "eos_token_id", "pad_token_id"):
        if name in fields:
            named[name] = fields.pop(name)
    if beams > 1:
        if sample:
            raise DecodeKitError("generation_config: beam sampling (num_beams > 1 with do_sample) is not supported")
        named["strategy"], options["num_beams"] = "beam", beams
        options.update({k: fields.pop(k) for k in ("length_penalty", "early_stopping") if k in fields})
    elif "prompt_lookup_num_tokens" in fields:
        named["strategy"] = "prompt_lookup"
        options.update(gamma=fields.pop("prompt_lookup_num_tokens"), draft_policy="fixed")
    if "num_assistant_tokens" in fields:  # drafts per step of assisted decoding (strategy speculative)
        options.update(gamma=fields.pop("num_assistant_tokens"), draft_policy="fixed")
    sampling = ("temperature", "top_k", "top_p", "min_p", "typical_p")
    if sample:
        named.setdefault("strategy", "sample")
        options.update({k: fields.pop(k) for k in sampling if k in fields})
    else:  # as transformers: without do_sample the sampling fields do nothing
        for k in sampling:
            fields.pop(k, None)
    options.update({k: fields.pop(k) for k in ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens",
                                                "num_return_sequences") if k in fields})
    _refuse_the_rest(fields, named)
    return options, named


def _refuse_the_rest(fields: dict, named: dict) -> None:
    if "max_length" in fields and "max_new_tokens" in named:
        fields.pop("max_length")  # max_new_tokens wins, as in transformers
    if fields:
        name = sorted(fields)[0]
        hint = ": give max_new_tokens" if name == "max_length" else ""
        raise DecodeKitError(f"generation_config.{name} is not supported by decodekit{hint}")


def _merge_config(config, given: dict, named: dict) -> tuple[dict, dict]:
    """The config's fields under the keyword arguments the caller set (keywords win)."""
    defaults = dict(strategy="greedy", max_new_tokens=64, eos_token_id=None, pad_token_id=None)
    options, from_named = from_generation_config(config)
    merged_named = {k: (named[k] if named[k] != defaults[k] else from_named.get(k, named[k])) for k in named}
    merged = {**options, **{k: v for k, v in given.items() if v is not None}}
    if "gamma" in options and "gamma" not in given and merged_named["strategy"] not in ("speculative", "prompt_lookup"):
        raise DecodeKitError("generation_config.num_assistant_tokens needs assisted decoding: pass "
                             "strategy='speculative' and drafter=...")
    return merged, merged_named


# ---------------------------------------------------------------------------- the served schema
def decoding_schema() -> dict:
    """Every strategy's options and the processor knobs as JSON Schema, from the same records
    that validate them (the server's ``GET /v1/decoding/options``; the playground builds its
    forms from it, so a new strategy or knob appears there with no page change)."""
    strategies = {}
    for name, strategy in STRATEGIES.items():
        props = {opt: json_schema(spec, default) for opt, default, spec in strategy.options.specs() if spec.cli}
        strategies[name] = {"summary": strategy.summary, "lossless": strategy.lossless,
                            "sampling": strategy.sampling, "type": "object", "properties": props}
    knobs = {name: {**json_schema(knob.spec), "stage": knob.stage} for name, knob in KNOBS.items()}
    return {"strategies": strategies, "knobs": {"type": "object", "properties": knobs}}
