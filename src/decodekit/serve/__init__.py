"""``decodekit serve``: an OpenAI-compatible server over one continuous-batching engine.

``engine`` (the batching loop), ``protocol`` (OpenAI requests and responses), ``app`` (the
FastAPI app and ``decodekit serve``), ``metrics`` (Prometheus text), ``static/playground.html``.
FastAPI and uvicorn come with the ``serve`` extra; importing this package needs neither.
"""

from decodekit.serve.engine import (  # the engine needs no web stack
    DoneEvent,
    Engine,
    EngineRequest,
    ErrorEvent,
    Handle,
    QueueFull,
    TokenEvent,
)

__all__ = ["Engine", "EngineRequest", "Handle", "TokenEvent", "DoneEvent", "ErrorEvent", "QueueFull"]
