"""``/metrics`` in the Prometheus text exposition format (version 0.0.4).

The engine's counters and gauges (``Engine.metrics()``) plus the HTTP layer's responses by
endpoint and status code. Every name is prefixed ``decodekit_``.
"""

from __future__ import annotations

import math
import threading
from collections import Counter

__all__ = ["HttpCounters", "render", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# engine metric -> (type, help)
ENGINE_METRICS = {
    "requests_total": ("counter", "requests the engine accepted"),
    "requests_running": ("gauge", "requests decoding now"),
    "queue_depth": ("gauge", "requests waiting for a batch slot"),
    "batch_size": ("gauge", "rows in the running batch"),
    "lanes": ("gauge", "batches decoding now (rows that can share a forward share one)"),
    "cache_columns": ("gauge", "KV cache columns of the widest lane (prompt, generated and padding)"),
    "generated_tokens_total": ("counter", "tokens generated"),
    "forwards_total": ("counter", "model forward passes"),
    "tokens_per_s": ("gauge", "recent generation throughput, tokens per second"),
    "acceptance_rate": ("gauge", "drafted tokens accepted / drafted (speculative strategies)"),
}


class HttpCounters:
    """Responses by ``(endpoint, code)``; counted from the server's request handlers."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def add(self, endpoint: str, code: int) -> None:
        with self.lock:
            self.counts[(endpoint, int(code))] += 1


def _number(value) -> str:
    value = float(value or 0)
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(engine_metrics: dict, http: HttpCounters) -> str:
    """The exposition text: ``# HELP``/``# TYPE`` lines then one sample per metric."""
    lines = []
    for name, (kind, help_text) in ENGINE_METRICS.items():
        if name not in engine_metrics:
            continue
        full = f"decodekit_{name}"
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}",
                  f"{full} {_number(engine_metrics[name])}"]
    lines += ["# HELP decodekit_http_responses_total HTTP responses by endpoint and status code",
              "# TYPE decodekit_http_responses_total counter"]
    with http.lock:
        counts = sorted(http.counts.items())
    for (endpoint, code), count in counts:
        lines.append(f'decodekit_http_responses_total{{endpoint="{_escape(endpoint)}",code="{code}"}} {count}')
    return "\n".join(lines) + "\n"
