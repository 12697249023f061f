"""Argument checks shared by every entry point.

Each check raises ``DecodeKitError`` (a ``ValueError``) whose message names the parameter
and what is allowed, so the CLI can print it as one line and exit with code 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


class DecodeKitError(ValueError):
    """Bad input: the message names the parameter and what is allowed."""


def check_int(name: str, value, *, min_value: int | None = None, max_value: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeKitError(f"{name} must be an integer, got {value!r}")
    if min_value is not None and value < min_value:
        raise DecodeKitError(f"{name} must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise DecodeKitError(f"{name} must be <= {max_value}, got {value}")
    return value


def check_float(
    name: str,
    value,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_inf: bool = False,
):
    """A real number (int or float, never bool or NaN) within the bounds; finite unless
    ``allow_inf``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise DecodeKitError(f"{name} must be a number, got {value!r}")
    if math.isinf(value) and not allow_inf:
        raise DecodeKitError(f"{name} must be a finite number, got {value}")
    if min_value is not None:
        bad = value < min_value if min_inclusive else value <= min_value
        if bad:
            op = ">=" if min_inclusive else ">"
            raise DecodeKitError(f"{name} must be {op} {min_value}, got {value}")
    if max_value is not None:
        bad = value > max_value if max_inclusive else value >= max_value
        if bad:
            op = "<=" if max_inclusive else "<"
            raise DecodeKitError(f"{name} must be {op} {max_value}, got {value}")
    return value


def check_top_p(top_p) -> float:
    check_float("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise DecodeKitError(f"top_p must be in (0, 1], got {top_p}")
    return top_p


def check_choice(name: str, value, allowed: Iterable):
    allowed = list(allowed)
    if value not in allowed:
        raise DecodeKitError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_stop_strings(stop_strings) -> list[str]:
    """``None | str | list[str]`` -> list of non-empty strings. A plain ``str`` is ONE stop
    string (as in transformers), never split into characters."""
    if stop_strings is None:
        return []
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, list | tuple):
        raise DecodeKitError(f"stop_strings must be a string or a list of strings, got {stop_strings!r}")
    for text in stop_strings:
        if not isinstance(text, str) or not text:
            raise DecodeKitError(f"stop_strings must be non-empty strings, got {text!r}")
    return list(stop_strings)


def check_token_ids(name: str, ids, vocab_size: int | None) -> None:
    """Every id of ``ids`` (a tensor or a list of ints) is in ``[0, vocab_size)``."""
    values = ids.flatten().tolist() if hasattr(ids, "flatten") else list(ids)
    if not values:
        return
    low, high = min(values), max(values)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        allowed = f"in [0, {vocab_size}) (the vocabulary)" if vocab_size is not None else ">= 0"
        raise DecodeKitError(f"{name} must be token ids {allowed}, got {bad}")


def normalize_eos(eos_token_id, vocab_size: int | None = None) -> list[int]:
    """``None | int | list[int]`` -> list of ids, each checked against the vocabulary."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise DecodeKitError(f"eos_token_id must be an int or a list of ints, got {tok!r}")
        if tok < 0 or (vocab_size is not None and tok >= vocab_size):
            raise DecodeKitError(
                f"eos_token_id must be in [0, {vocab_size}) (the vocabulary), got {tok}"
            )
    return ids
