"""``decodekit bench``: every strategy and transformers' ``generate()`` side by side.

The package reads in the order a benchmark runs:

1. ``config`` - the table of strategies (``ENTRIES``: how to call ``decodekit.generate``
   for each, and its transformers equivalent if any), presets and suites; arguments are
   validated (``resolve_config``) before any model is loaded,
2. ``card`` - the machine card (versions, weight bytes, measured memory bandwidth, the
   implied floor in ms per token), measured once and rendered by ``card_items``,
3. ``runners`` - the runs (strategy, implementation, dtype, batch size), each timed over
   every prompt of the chosen suites with interleaved trials, the bare forward loop that
   gives the floor, the memory sampler and the forward counter,
4. ``checks`` - identity with greedy / transformers and quality of each run's output,
5. ``report`` - summaries (tokens/s, ratios, forwards per token, acceptance, memory,
   identity, quality), report.md, results.json and plots,
6. ``cli`` - ``add_arguments(parser)`` and ``run(args)``, mounted by ``decodekit.cli``.

Ctrl-C stops the trials and writes what was measured so far.
"""

from decodekit.bench.card import machine_card
from decodekit.bench.cli import add_arguments, run, run_bench
from decodekit.bench.config import (
    ENTRIES,
    PRESETS,
    SUITES,
    BenchConfig,
    BenchEntry,
    load_suite,
    resolve_config,
)
from decodekit.bench.runners import floor_generate

__all__ = ["BenchEntry", "ENTRIES", "PRESETS", "SUITES", "add_arguments", "run", "resolve_config",
           "BenchConfig", "load_suite", "machine_card", "floor_generate", "run_bench"]
