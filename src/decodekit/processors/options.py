"""The processor knobs as typed records, one ``Knob`` per name (transformers' / OpenAI's):
what it accepts (a ``Spec``, as strategy options have), its CLI flag, and the processing step
it adds to the pipeline. ``KNOBS`` holds them in transformers' order; the API, the CLI, the
server and Ray all read it, so adding a knob is one ``Knob`` (its field and its step):

    KNOBS["ban_token"] = Knob("ban_token", Spec(int, "never generate this id", min=0),
                              step=lambda value, knobs, eos: SuppressTokens([value]))

``check_processor_options`` validates a set of knobs once (a one-line ``DecodeKitError``
naming the first bad one; token ids against the vocabulary when it is known).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from decodekit.processors.steps import (
    BadWords,
    LogitBias,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    id_list,
)
from decodekit.specs import Spec
from decodekit.validation import DecodeKitError, check_float, check_int, check_top_p

__all__ = ["Knob", "KNOBS", "PROCESSOR_OPTIONS", "sampling_knobs", "check_processor_options",
           "check_min_new_tokens", "is_set"]


@dataclass(frozen=True)
class Knob:
    """One processor knob.

    ``step(value, knobs, eos_ids)`` -> the processing step for this value, or None (off);
    ``knobs`` are all the set knobs (a step may read a partner: presence with frequency).
    ``stage``: ``"history"`` (on the raw logits, every strategy) or ``"sampling"`` (after the
    user's processors, only when sampling). ``check(value, vocab_size)``: what ``spec`` cannot
    say (token ids against the vocabulary). CLI: ``cli_type`` parses one flag value,
    ``cli_repeat`` lets the flag repeat, ``from_cli`` turns what was parsed into the value;
    ``cli=False`` when the CLI has its own flag (temperature, top_k, top_p)."""

    name: str
    spec: Spec
    step: Callable[[Any, Mapping, list[int]], Any] | None = None
    stage: str = "history"
    check: Callable[[Any, int | None], None] | None = None
    cli_type: Callable[[str], Any] | None = None
    cli_repeat: bool = False
    from_cli: Callable[[Any], Any] | None = None
    cli: bool = True

    def validate(self, value, vocab_size: int | None = None) -> None:
        self.spec.check(self.name, value)
        if self.check is not None:
            self.check(value, vocab_size)

    def flag_kwargs(self) -> dict:
        """argparse settings of ``--name``."""
        if self.spec.kind is bool:
            return dict(action="store_const", const=True, default=None, help=self.spec.help)
        kwargs = dict(type=self.cli_type or self.spec.kind, default=None, help=self.spec.help)
        if self.cli_repeat:
            kwargs["action"] = "append"
        return kwargs


def is_set(value) -> bool:
    """None and False are a knob's "off" values."""
    return value is not None and value is not False


# ---------------------------------------------------------------------------- checks
def check_min_new_tokens(min_new_tokens, max_new_tokens) -> None:
    """``min_new_tokens`` is an integer >= 0 and not above ``max_new_tokens`` (when both given)."""
    if min_new_tokens is None:
        return
    check_int("min_new_tokens", min_new_tokens, min_value=0)
    if max_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise DecodeKitError(f"min_new_tokens must be <= max_new_tokens ({max_new_tokens}), got {min_new_tokens}")


def _check_token_id(name: str, token_id, vocab_size: int | None) -> None:
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
        raise DecodeKitError(f"{name} must hold token ids (integers >= 0), got {token_id!r}")
    if vocab_size is not None and token_id >= vocab_size:
        raise DecodeKitError(f"{name} token id {token_id} is out of the vocabulary (size {vocab_size})")


def _check_logit_bias(logit_bias, vocab_size: int | None) -> None:
    if not isinstance(logit_bias, Mapping):
        raise DecodeKitError(f"logit_bias must map token ids to biases, got {logit_bias!r}")
    for key, bias in logit_bias.items():
        token_id = int(key) if isinstance(key, str) and key.isdigit() else key
        _check_token_id("logit_bias", token_id, vocab_size)
        check_float(f"logit_bias[{key!r}]", bias, allow_inf=True)
        if bias == math.inf:
            raise DecodeKitError(f"logit_bias[{key!r}] must be finite or -inf, got {bias}")


def _check_bad_words(bad_words_ids, vocab_size: int | None) -> None:
    if not isinstance(bad_words_ids, list | tuple) or not all(isinstance(w, list | tuple) and w for w in bad_words_ids):
        raise DecodeKitError(f"bad_words_ids must be a list of non-empty lists of token ids, got {bad_words_ids!r}")
    for word in bad_words_ids:
        for token_id in word:
            _check_token_id("bad_words_ids", token_id, vocab_size)


def _check_suppress(suppress_tokens, vocab_size: int | None) -> None:
    if not isinstance(suppress_tokens, list | tuple):
        raise DecodeKitError(f"suppress_tokens must be a list of token ids, got {suppress_tokens!r}")
    for token_id in suppress_tokens:
        _check_token_id("suppress_tokens", token_id, vocab_size)


def _check_positive(name: str) -> Callable[[Any, int | None], None]:
    def check(value, vocab_size) -> None:
        if value <= 0:
            raise DecodeKitError(f"{name} must be > 0, got {value}")
    return check


# ---------------------------------------------------------------------------- CLI text
def _token_bias(text: str) -> tuple[int, float]:
    token, _, bias = text.partition(":")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be TOKEN_ID:BIAS, got {text!r}") from None


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated token ids, got {text!r}") from None


# ---------------------------------------------------------------------------- steps
def _min_new_tokens(value, knobs, eos):
    if not id_list(eos):
        raise DecodeKitError("min_new_tokens needs an eos_token_id, and none is known")
    return MinNewTokens(value, eos)


def _presence(value, knobs, eos):
    """One step for both OpenAI penalties (presence's, taking frequency's value too)."""
    frequency = knobs.get("frequency_penalty") or 0.0
    return PresenceFrequencyPenalty(value, frequency) if value or frequency else None


def _frequency(value, knobs, eos):
    """Frequency's step when presence has none."""
    return None if is_set(knobs.get("presence_penalty")) or not value else PresenceFrequencyPenalty(0.0, value)


def _below_one(step_class):
    return lambda value, knobs, eos: step_class(value) if value < 1.0 else None


_KNOBS = [
    # history stage, transformers' order: on the raw logits, for every strategy
    Knob("logit_bias", Spec("any", "TOKEN_ID:BIAS added to a logit (repeatable); -inf bans it"),
         step=lambda v, k, eos: LogitBias(v) if v else None, check=_check_logit_bias,
         cli_type=_token_bias, cli_repeat=True, from_cli=dict),
    Knob("repetition_penalty", Spec(float, "> 1 discourages tokens already in prompt or output", min=0.0),
         step=lambda v, k, eos: RepetitionPenalty(v) if v != 1.0 else None,
         check=_check_positive("repetition_penalty")),
    Knob("presence_penalty", Spec(float, "OpenAI: subtract this once from every generated token's logit",
                                  min=-2.0, max=2.0), step=_presence),
    Knob("frequency_penalty", Spec(float, "OpenAI: subtract this times the token's count in the output",
                                   min=-2.0, max=2.0), step=_frequency),
    Knob("no_repeat_ngram_size", Spec(int, "never repeat an n-gram of this size", min=0),
         step=lambda v, k, eos: NoRepeatNGram(v) if v else None),
    Knob("bad_words_ids", Spec("any", "comma-separated ids never generated in a row (repeatable)"),
         step=lambda v, k, eos: BadWords(v, eos) if v else None, check=_check_bad_words,
         cli_type=_token_ids, cli_repeat=True),
    Knob("min_new_tokens", Spec(int, "no EOS before this many new tokens", min=0),
         step=lambda v, k, eos: _min_new_tokens(v, k, eos) if v else None),
    Knob("suppress_tokens", Spec("any", "comma-separated ids never generated"),
         step=lambda v, k, eos: SuppressTokens(v) if v else None, check=_check_suppress, cli_type=_token_ids),
    Knob("ignore_eos", Spec(bool, "never stop at EOS (generate max_new_tokens)"),
         step=lambda v, k, eos: SuppressTokens(id_list(eos)) if v and id_list(eos) else None),
    # sampling stage, after the user's processors: only when sampling
    Knob("temperature", Spec(float, "softmax temperature; 0 is greedy", min=0.0), stage="sampling",
         step=lambda v, k, eos: Temperature(v) if v != 1.0 else None, cli=False),
    Knob("top_k", Spec(int, "sample among the k most likely tokens", min=1), stage="sampling",
         step=lambda v, k, eos: TopK(v), cli=False),
    Knob("top_p", Spec(float, "nucleus: the smallest set of tokens with this much probability", max=1.0),
         stage="sampling", step=_below_one(TopP), check=lambda v, vocab: check_top_p(v), cli=False),
    Knob("min_p", Spec(float, "keep tokens with p >= min_p * p_max (sampling)", min=0.0, max=1.0),
         stage="sampling", step=lambda v, k, eos: MinP(v) if v else None),
    Knob("typical_p", Spec(float, "locally typical sampling mass", min=0.0, max=1.0), stage="sampling",
         step=_below_one(TypicalP)),
]
KNOBS: dict[str, Knob] = {knob.name: knob for knob in _KNOBS}
PROCESSOR_OPTIONS = KNOBS  # the knobs' names (the name generate and the server have used)


def sampling_knobs() -> list[str]:
    """The knobs of the sampling stage (temperature, top_k, top_p, min_p, typical_p...)."""
    return [name for name, knob in KNOBS.items() if knob.stage == "sampling"]


def check_processor_options(options: Mapping, vocab_size: int | None = None) -> None:
    """Raise a one-line ``DecodeKitError`` naming the first bad knob of ``options`` (names of
    ``KNOBS``; None means unset). Token ids are checked against ``vocab_size``."""
    unknown = set(options) - set(KNOBS)
    if unknown:
        raise TypeError(f"unknown processor options: {sorted(unknown)}")
    for name, knob in KNOBS.items():
        value = options.get(name)
        if value is not None:
            knob.validate(value, vocab_size)
