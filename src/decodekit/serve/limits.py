"""What the server refuses before a request is queued, and how long a request may run.

* the body: at most ``max_body_bytes`` (413), read in chunks so a huge body is never held whole;
* the prompt and ``max_tokens``: the prompt below the model's context, ``max_tokens`` at most
  ``max_tokens_limit`` (400); without ``max_tokens`` the default is cut to what fits;
* strategy options that multiply a request's rows or work (``num_beams``, EIS' ``top_k`` and
  ``lookahead_steps``...) at most ``WIDTH_LIMITS`` (400): one request cannot exhaust memory;
* a request's ``drafter`` names no file: ``layers:N``, ``eagle[:NAME]`` or a bundled model
  (the server loads nothing else from its disk on a client's word);
* ``timeout``: the server's, and a request's own (the body's ``timeout``, seconds), the smaller
  wins; measured from the moment the request is queued;
* the process's memory: ``cap_malloc_arenas`` keeps glibc from giving each of the request
  threads its own allocator arena (RSS grew 11-13% over a soak without it, 7% with two).

Every refusal is a ``LimitError``: a status, OpenAI's error fields and the headers to send.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
from dataclasses import dataclass

from decodekit.serve.protocol import MAX_N, Parsed, error_body

__all__ = ["Limits", "LimitError", "read_body", "check_parsed", "request_timeout", "busy", "cap_malloc_arenas"]

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 20,000-word prompt is ~130 kB
RETRY_AFTER_S = 1  # the Retry-After of a 429: a row frees in well under a second on a busy server
# option -> (strategies it limits (None: all), the largest value a request may ask for)
WIDTH_LIMITS = {
    "num_return_sequences": (None, MAX_N), "num_beams": (("beam",), 16), "expansion_top_k": (("beam",), 64),
    "top_k": (("eis",), 16), "lookahead_steps": (("eis",), 8), "block_size": (("jacobi",), 64),
    "max_iterations": (("jacobi",), 1024), "ngram_n": (None, 16), "filler_top_k": (None, 64),
}


@dataclass
class Limits:
    context: int | None = None  # the model's context, in tokens
    max_tokens_limit: int | None = None  # the largest max_tokens a request may ask for
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout: float | None = None  # seconds a request may take, queueing included
    retry_after: int = RETRY_AFTER_S


class LimitError(Exception):
    """A request refused by a limit: ``status``, OpenAI's error body and extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(str(self), self.param, self.kind, self.code)


def _too_large(limit: int) -> LimitError:
    return LimitError(413, f"the request body is over {limit} bytes (the server's --max_body_bytes)",
                      code="body_too_large")


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _given_max_tokens(body: dict):
    return body.get("max_completion_tokens", body.get("max_tokens"))


def check_parsed(parsed: Parsed, body: dict, limits: Limits) -> None:
    """The prompt below the context and ``max_tokens`` within the server's limit (400 naming
    the field); a default ``max_tokens`` is cut to what fits in the context."""
    _check_width(parsed)
    _check_drafter(parsed.params.get("drafter"))
    length = len(parsed.prompt_ids)
    context = limits.context
    if context is not None and length >= context:
        raise LimitError(400, f"prompt is {length} tokens; the model's context is {context} tokens "
                              "(prompt length must be below it)", parsed.origins.get("prompt", "prompt"),
                         code="context_length_exceeded")
    wanted = parsed.params.get("max_new_tokens")
    if _given_max_tokens(body) is None:
        if context is not None and wanted is not None and length + wanted > context:
            parsed.params["max_new_tokens"] = context - length
        return
    cap = limits.max_tokens_limit
    if cap is not None and wanted is not None and wanted > cap:
        raise LimitError(400, f"max_tokens is {wanted}; this server allows at most {cap} "
                              "(its --max_tokens_limit)", "max_tokens")


def _check_width(parsed: Parsed) -> None:
    """Options that multiply a request's rows or work stay within ``WIDTH_LIMITS`` (400)."""
    strategy = parsed.params.get("strategy")
    for name, (strategies, cap) in WIDTH_LIMITS.items():
        value = parsed.params.get(name)
        applies = strategies is None or strategy in strategies
        if applies and isinstance(value, int) and value > cap:
            param = parsed.origins.get(name, f"decoding.{name}")
            raise LimitError(400, f"{param} is {value}; this server allows at most {cap}", param)


def _check_drafter(drafter) -> None:
    if drafter is None:
        return
    from decodekit.models import BUNDLED_MODELS

    spec = drafter.strip().removesuffix("+prompt_lookup") if isinstance(drafter, str) else ""
    if re.fullmatch(r"layers:\d+|eagle(:\w[\w-]*)?", spec) or spec in BUNDLED_MODELS:
        return
    raise LimitError(400, f"decoding.drafter must be layers:N, eagle, eagle:NAME or a bundled model "
                          f"({', '.join(BUNDLED_MODELS)}), optionally +prompt_lookup; got {drafter!r} (a "
                          "server loads no other model on a request's word)", "decoding.drafter")


def request_timeout(body: dict, limits: Limits) -> float | None:
    """Seconds this request may take: the smaller of the body's ``timeout`` and the server's."""
    own = body.get("timeout")
    if own is not None:
        number = isinstance(own, int | float) and not isinstance(own, bool)
        if not number or not math.isfinite(own) or own <= 0:
            raise LimitError(400, f"timeout must be a number of seconds > 0, got {own!r}", "timeout")
    given = [t for t in (own, limits.timeout) if t is not None]
    return float(min(given)) if given else None


def busy(reason: str, limits: Limits) -> LimitError:
    """The 429 of a full queue, with ``Retry-After``."""
    return LimitError(429, f"the server is busy ({reason}); retry later", kind="rate_limit_error",
                      code="queue_full", headers={"Retry-After": str(limits.retry_after)})


M_ARENA_MAX = -8  # glibc's mallopt parameter


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (what ``MALLOC_ARENA_MAX`` does), unless the user set that
    variable; call before the server's threads start. False where there is no glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_ARENA_MAX, arenas))
    except OSError:
        return False
