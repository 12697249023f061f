"""Decoding strategies: one module each, registered in ONE table, ``STRATEGIES``.

A ``Strategy`` record (``strategies/options.py``) names the decode function, its typed
``Options`` dataclass (which validates itself), its trace formatter and whether it is lossless.
``generate``, the CLI flags and the benchmark all read this table: adding a strategy is one
module plus one line here.
"""

from __future__ import annotations

from decodekit.strategies import autoregressive, beam, eis, ngram, refine, speculative
from decodekit.strategies.options import Options, Strategy
from decodekit.validation import check_choice
from decodekit.visual import format_draft_trace

__all__ = ["STRATEGIES", "Strategy", "Options", "get_strategy", "build_options", "option_names"]

_REGISTRY = [
    Strategy("greedy", autoregressive.decode, autoregressive.AutoregressiveOptions,
             "argmax, one token per forward", lossless=True, sampling="none"),
    Strategy("sample", autoregressive.decode, autoregressive.AutoregressiveOptions,
             "temperature -> top-k -> top-p sampling, seeded", sampling="required"),
    Strategy("beam", beam.decode, beam.BeamOptions, "batched beam search on one KV cache",
             format_trace=beam.format_beam_trace, logprobs=False),
    Strategy("eis", eis.decode, eis.EisOptions, "Extended Inference Sampler: lookahead rollouts",
             sampling="own", format_trace=eis.format_eis_trace, logprobs=False, constrained=False),
    Strategy("refine", refine.decode_refine, refine.RefineOptions,
             "the seed's iterative block refinement (lossy on plain LMs)", sampling="none",
             format_trace=refine.format_refine_trace, constrained=False),
    Strategy("jacobi", refine.decode_jacobi, refine.JacobiOptions, "Jacobi decoding (= greedy)",
             lossless=True, sampling="none", format_trace=refine.format_refine_trace),
    Strategy("speculative", speculative.decode, speculative.SpeculativeOptions,
             "draft model proposes, target verifies", lossless=True, format_trace=format_draft_trace,
             make_drafter=speculative.make_drafter),
    Strategy("ngram", ngram.decode, ngram.NgramOptions, "NASD: n-gram storage drafts",
             lossless=True, format_trace=format_draft_trace, make_drafter=ngram.make_ngram_drafter),
    Strategy("prompt_lookup", ngram.decode_prompt_lookup, ngram.PromptLookupOptions,
             "drafts copied from prompt + output", lossless=True, format_trace=format_draft_trace,
             make_drafter=ngram.make_prompt_lookup_drafter),
]
STRATEGIES: dict[str, Strategy] = {s.name: s for s in _REGISTRY}


def get_strategy(name: str) -> Strategy:
    check_choice("strategy", name, STRATEGIES)
    return STRATEGIES[name]


def build_options(name: str, options: dict, knobs: dict | None = None) -> Options:
    """Validate ``options`` for strategy ``name`` (unknown names and bad values are
    ``DecodeKitError``). ``knobs``: temperature / top_k / top_p, which become options of a
    strategy that owns them (EIS) and are otherwise left to the processor."""
    strategy = get_strategy(name)
    values = dict(options)
    if strategy.sampling == "own":
        values.update({k: v for k, v in (knobs or {}).items() if v is not None})
    return strategy.options.from_dict(name, values)


def option_names() -> dict[str, list[str]]:
    """Option name -> the strategies that take it (for the CLI: one flag per name)."""
    names: dict[str, list[str]] = {}
    for strategy in STRATEGIES.values():
        for name, _, _ in strategy.options.specs():
            names.setdefault(name, []).append(strategy.name)
    return names
