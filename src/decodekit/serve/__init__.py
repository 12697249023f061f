"""``decodekit serve``: an OpenAI-compatible server over one continuous-batching engine.

``engine`` (the batching loop), ``protocol`` (OpenAI requests and responses), ``app`` (the
FastAPI app and ``decodekit serve``), ``metrics`` (Prometheus text), ``static/playground.html``.
FastAPI and uvicorn come with the ``serve`` extra; importing this package needs neither.
"""
