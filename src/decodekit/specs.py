"""What one option accepts (``Spec``) and the CLI text parsers options use. Strategy options
(``strategies/options.py``) and processor knobs (``processors/options.py``) are both made of
``Spec`` s, so validation, CLI flags, help text and the served JSON Schema come from one place.
Imports nothing of decodekit but ``validation``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from decodekit.validation import DecodeKitError, check_choice, check_float, check_int

__all__ = ["Spec", "option", "json_schema", "parse_bool", "parse_bool_or", "parse_int_or"]


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


JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def json_schema(spec: Spec, default=None) -> dict:
    """One option as JSON Schema (type, bounds, choices, default, help as description): what
    the server's ``/v1/decoding/options`` serves and the playground turns into a form field."""
    out: dict[str, Any] = {"description": spec.help}
    if spec.choices is not None:
        out["enum"] = list(spec.choices)
    elif spec.kind in JSON_TYPES:
        out["type"] = JSON_TYPES[spec.kind]
    if spec.min is not None:
        out["minimum"] = spec.min
    if spec.max is not None:
        out["maximum"] = spec.max
    if default is None or isinstance(default, str | int | float | bool):
        out["default"] = default
    if spec.optional or default is None:
        out["nullable"] = True
    return out


def option(default, help: str, kind=None, **spec) -> Any:
    """A dataclass field for an ``Options`` class: ``option(5, "drafts per step", int, min=1)``."""
    if kind is None:
        kind = type(default)
    return field(default=default, metadata={"spec": Spec(kind, help, **spec)})
