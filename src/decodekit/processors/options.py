"""The processor knobs (``PROCESSOR_OPTIONS``: transformers / OpenAI names and their "off"
values) and their checks: a one-line ``DecodeKitError`` naming the first bad knob."""

from __future__ import annotations

import math
from collections.abc import Mapping

from decodekit.validation import DecodeKitError, check_float, check_int, check_top_p

__all__ = ["PROCESSOR_OPTIONS", "check_processor_options", "check_min_new_tokens"]

# The knobs ``make_pipeline`` takes (transformers/OpenAI names) and their "off" values.
PROCESSOR_OPTIONS = {
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "min_p": None,
    "typical_p": None,
    "repetition_penalty": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "no_repeat_ngram_size": None,
    "logit_bias": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "min_new_tokens": None,
    "ignore_eos": False,
}


def check_min_new_tokens(min_new_tokens, max_new_tokens) -> None:
    """``min_new_tokens`` is an integer >= 0 and not above ``max_new_tokens`` (when both given)."""
    if min_new_tokens is None:
        return
    check_int("min_new_tokens", min_new_tokens, min_value=0)
    if max_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise DecodeKitError(f"min_new_tokens must be <= max_new_tokens ({max_new_tokens}), got {min_new_tokens}")


def check_processor_options(options: Mapping, vocab_size: int | None = None) -> None:
    """Raise a one-line ``DecodeKitError`` naming the first bad knob of ``options`` (names of
    ``PROCESSOR_OPTIONS``; None means unset). Token ids are checked against ``vocab_size``."""
    unknown = set(options) - set(PROCESSOR_OPTIONS)
    if unknown:
        raise TypeError(f"unknown processor options: {sorted(unknown)}")
    get = options.get
    _check_sampling(get("temperature"), get("top_k"), get("top_p"), get("min_p"), get("typical_p"))
    _check_penalties(get("repetition_penalty"), get("presence_penalty"), get("frequency_penalty"))
    if get("no_repeat_ngram_size") is not None:
        check_int("no_repeat_ngram_size", get("no_repeat_ngram_size"), min_value=0)
    check_min_new_tokens(get("min_new_tokens"), None)
    if not isinstance(get("ignore_eos", False), bool):
        raise DecodeKitError(f"ignore_eos must be True or False, got {get('ignore_eos')!r}")
    _check_logit_bias(get("logit_bias"), vocab_size)
    _check_token_lists(get("bad_words_ids"), get("suppress_tokens"), vocab_size)


def _check_sampling(temperature, top_k, top_p, min_p, typical_p) -> None:
    if temperature is not None:
        check_float("temperature", temperature, min_value=0.0)
    if top_k is not None:
        check_int("top_k", top_k, min_value=1)
    if top_p is not None:
        check_top_p(top_p)
    for name, value in (("min_p", min_p), ("typical_p", typical_p)):
        if value is not None:
            check_float(name, value)
            if not 0.0 <= value <= 1.0:
                raise DecodeKitError(f"{name} must be in [0, 1], got {value}")


def _check_penalties(repetition_penalty, presence_penalty, frequency_penalty) -> None:
    if repetition_penalty is not None:
        check_float("repetition_penalty", repetition_penalty, min_value=0.0, min_inclusive=False)
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None:
            check_float(name, value)
            if not -2.0 <= value <= 2.0:
                raise DecodeKitError(f"{name} must be in [-2, 2], got {value}")


def _check_token_id(name: str, token_id, vocab_size: int | None) -> None:
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
        raise DecodeKitError(f"{name} must hold token ids (integers >= 0), got {token_id!r}")
    if vocab_size is not None and token_id >= vocab_size:
        raise DecodeKitError(f"{name} token id {token_id} is out of the vocabulary (size {vocab_size})")


def _check_logit_bias(logit_bias, vocab_size: int | None) -> None:
    if logit_bias is None:
        return
    if not isinstance(logit_bias, Mapping):
        raise DecodeKitError(f"logit_bias must map token ids to biases, got {logit_bias!r}")
    for key, bias in logit_bias.items():
        token_id = int(key) if isinstance(key, str) and key.isdigit() else key
        _check_token_id("logit_bias", token_id, vocab_size)
        check_float(f"logit_bias[{key!r}]", bias, allow_inf=True)
        if bias == math.inf:
            raise DecodeKitError(f"logit_bias[{key!r}] must be finite or -inf, got {bias}")


def _check_token_lists(bad_words_ids, suppress_tokens, vocab_size: int | None) -> None:
    if bad_words_ids is not None:
        if not isinstance(bad_words_ids, list | tuple) or not all(isinstance(w, list | tuple) and w for w in bad_words_ids):
            raise DecodeKitError(f"bad_words_ids must be a list of non-empty lists of token ids, got {bad_words_ids!r}")
        for word in bad_words_ids:
            for token_id in word:
                _check_token_id("bad_words_ids", token_id, vocab_size)
    if suppress_tokens is not None:
        if not isinstance(suppress_tokens, list | tuple):
            raise DecodeKitError(f"suppress_tokens must be a list of token ids, got {suppress_tokens!r}")
        for token_id in suppress_tokens:
            _check_token_id("suppress_tokens", token_id, vocab_size)
