"""Decoding strategies. Each module reads top to bottom and exposes ``decode(request, **options)``.

``STRATEGIES`` maps a public strategy name to ``module:function``; modules are imported
lazily so that importing decodekit stays cheap.
"""

from __future__ import annotations

import importlib

STRATEGIES: dict[str, str] = {
    "greedy": "decodekit.strategies.autoregressive:decode",
    "sample": "decodekit.strategies.autoregressive:decode",
    "beam": "decodekit.strategies.beam:decode",
    "eis": "decodekit.strategies.eis:decode",
    "refine": "decodekit.strategies.refine:decode_refine",
    "jacobi": "decodekit.strategies.refine:decode_jacobi",
    "speculative": "decodekit.strategies.speculative:decode",
    "ngram": "decodekit.strategies.ngram:decode",
    "prompt_lookup": "decodekit.strategies.ngram:decode_prompt_lookup",
}


def get_strategy(name: str):
    module_name, func = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module_name), func)
