"""Typed strategy options and the ``Strategy`` record.

Every strategy declares its options as a dataclass deriving from ``Options``; each field is
made with ``option(...)``, which records its type, bounds and help text. From those fields:

* ``Options.from_dict`` refuses unknown names and ``__post_init__`` checks every value, so
  constructing the dataclass IS the validation (``generate`` and the CLI both do it before any
  model loads);
* the CLI builds its flags, help text and defaults (``decodekit.cli``);
* the benchmark names its entries.

A bad value raises ``DecodeKitError`` naming the option and what is allowed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from decodekit.validation import DecodeKitError, check_choice, check_float, check_int

__all__ = ["Spec", "option", "Options", "Strategy", "parse_bool", "parse_bool_or", "parse_int_or"]


def parse_bool(text: str) -> bool:
    """CLI text -> bool (true/false, yes/no, 1/0)."""
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


def parse_bool_or(word: str) -> Callable[[str], Any]:
    """CLI text -> bool, or the one extra ``word`` (``early_stopping``: true | false | never)."""

    def parse(text: str):
        if text == word:
            return word
        try:
            return parse_bool(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be true, false or {word}, got {text!r}") from None

    return parse


def parse_int_or(word: str) -> Callable[[str], Any]:
    """CLI text -> int, or the one extra ``word`` (``refine_iter``: N | converge)."""

    def parse(text: str):
        if text == word:
            return word
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer or {word}, got {text!r}") from None

    return parse


@dataclass(frozen=True)
class Spec:
    """What one option accepts: ``kind`` is int, float, bool, str or ``"any"`` (checked by the
    options class itself); ``optional`` allows None; ``parse`` turns CLI text into a value."""

    kind: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    optional: bool = False
    parse: Callable[[str], Any] | None = None
    cli: bool = True  # False: API only (objects such as a storage)

    def check(self, name: str, value) -> None:
        if value is None and self.optional:
            return
        if self.choices is not None:
            check_choice(name, value, self.choices)
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise DecodeKitError(f"{name} must be True or False, got {value!r}")
        elif self.kind in (int, float):
            (check_int if self.kind is int else check_float)(name, value)
            if self.kind is float and math.isinf(value):
                raise DecodeKitError(f"{name} must be a finite number, got {value}")
            low, high = self.min, self.max
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = " and ".join(b for b in (low is not None and f">= {low}", high is not None and f"<= {high}") if b)
                raise DecodeKitError(f"{name} must be {bounds}, got {value}")

    def describe(self) -> str:
        """``int >= 1``, ``one of: a, b`` ...: the allowed values, for help text."""
        if self.choices is not None:
            return "one of: " + ", ".join(map(str, self.choices))
        if not isinstance(self.kind, type):
            return ""
        kind = self.kind.__name__
        bounds = [f">= {self.min}" if self.min is not None else "", f"<= {self.max}" if self.max is not None else ""]
        return " ".join([kind, *(b for b in bounds if b)])


def option(default, help: str, kind=None, **spec) -> Any:
    """A dataclass field for an ``Options`` class: ``option(5, "drafts per step", int, min=1)``."""
    if kind is None:
        kind = type(default)
    return field(default=default, metadata={"spec": Spec(kind, help, **spec)})


@dataclass(frozen=True)
class Options:
    """Base of every strategy's options. Construct to validate; ``validate`` adds cross-field
    checks in subclasses."""

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["spec"].check(f.name, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields (subclasses override)."""

    @property
    def samples_per_prompt(self) -> int:
        """Rows decoded per prompt, sharing its prefill (``num_return_sequences`` when sampling)."""
        return 1

    @classmethod
    def specs(cls) -> list[tuple[str, Any, Spec]]:
        """``(name, default, spec)`` for every field, in declaration order."""
        out = []
        for f in fields(cls):
            default = None if f.default is MISSING else f.default
            out.append((f.name, default, f.metadata["spec"]))
        return out

    @classmethod
    def from_dict(cls, strategy: str, values: dict) -> Options:
        """Build from keyword options, refusing names this strategy does not take."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise DecodeKitError(
                f"unknown option(s) {', '.join(unknown)} for strategy {strategy!r}; "
                f"allowed: {', '.join(names) or 'none'}"
            )
        return cls(**values)


@dataclass(frozen=True)
class Strategy:
    """One decoding strategy: how ``generate``, the CLI and the benchmark know it.

    ``decode(request, options)`` runs it; ``sampling`` says what temperature / top_k / top_p
    mean to it: ``"none"`` (refused: greedy), ``"required"`` (sampling, temperature defaults to
    1), ``"optional"`` (a processor when given, greedy otherwise) or ``"own"`` (they are fields of
    its ``options``: EIS scores candidates with them)."""

    name: str
    decode: Callable
    options: type[Options]
    summary: str
    lossless: bool = False
    sampling: str = "optional"
    format_trace: Callable | None = None  # (output.debug, tokenizer) -> str
    logprobs: bool = True  # can report each token's log-probability (generate(logprobs=N))
    constrained: bool = True  # takes structured output (json_schema=, regex=...: decodekit.constraints)
    # (request, options) -> its Drafter, for a strategy that runs the speculative loop: decode
    # and the server's continuous batching build drafters with this one function
    make_drafter: Callable | None = None
