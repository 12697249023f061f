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

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from decodekit.specs import Spec, option, parse_bool, parse_bool_or, parse_int_or
from decodekit.validation import DecodeKitError

__all__ = ["Spec", "option", "Options", "Strategy", "parse_bool", "parse_bool_or", "parse_int_or"]


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
