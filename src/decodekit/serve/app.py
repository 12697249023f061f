"""The HTTP server: OpenAI-compatible endpoints over one ``Engine`` (continuous batching).

``create_app(engine, tokenizer, model_id)`` builds the FastAPI app:

* ``POST /v1/chat/completions``, ``POST /v1/completions``: OpenAI bodies plus a ``decoding``
  extension object (``protocol``); ``stream: true`` answers with server-sent events in OpenAI's
  chunk format, ending ``data: [DONE]``;
* ``GET /v1/models``, ``GET /v1/decoding/options`` (every strategy's options and the processor
  knobs as JSON Schema), ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /`` (the playground).

Bad input is a 400 with OpenAI's error body naming the field (``param``); limits
(``serve.limits``): a body over ``max_body_bytes`` is a 413, a full queue a 429 with
``Retry-After``, a request past its ``timeout`` a 408 (or an error event in its stream); a
client that goes away mid-request has its rows cancelled (``Handle.cancel``). A request that
fails while decoding is a 500 (or an error event) for it alone. While the server drains
(``serve.shutdown``) new requests are 503. With an ``api_key``, ``/v1/*`` and ``/metrics`` need
``Authorization: Bearer <key>`` (401 otherwise). The engine calls back from its own thread;
``EventQueue`` hands its events to the event loop. ``/openapi.json`` documents every status
(``serve.openapi``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from decodekit.params import decoding_schema
from decodekit.serve import metrics as prom
from decodekit.serve import openapi
from decodekit.serve.limits import (
    LimitError,
    Limits,
    busy,
    cap_malloc_arenas,
    check_parsed,
    read_body,
    request_timeout,
)
from decodekit.serve.protocol import (
    FieldError,
    Parsed,
    error_body,
    error_param,
    parse_chat,
    parse_completion,
)
from decodekit.serve.responses import Response as Answer
from decodekit.serve.shutdown import SHUTDOWN_CODE, Drain, graceful_server
from decodekit.validation import DecodeKitError

__all__ = ["create_app", "BackgroundServer", "EventQueue"]

PROTECTED = ("/v1/", "/metrics")
DISCONNECT_POLL_S = 0.5
DEFAULT_GRACE_S = 30.0
SHUTDOWN_TIMEOUT_S = 5.0  # after the drain: connections still open this long are closed
# an engine ErrorEvent's code -> (HTTP status, OpenAI error type)
ERROR_STATUS = {"timeout": (408, "timeout_error"), SHUTDOWN_CODE: (503, "server_error"),
                "engine_stopped": (503, "server_error"), "invalid_request": (400, "invalid_request_error")}


class EventQueue:
    """``on_event`` for ``Engine.submit``: called from the engine thread, read in the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            pass

    async def next(self, deadline: float | None, poll: float | None = None):
        """The next event; a timeout ``ErrorEvent`` past ``deadline``; None after ``poll`` s."""
        wait = poll
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            wait = left if wait is None else min(wait, left)
        try:
            return await asyncio.wait_for(self.queue.get(), wait)
        except asyncio.TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                return _timed_out()
            return None

    async def events(self, n: int, deadline: float | None = None):
        """Events until every one of the ``n`` choices is done or the request failed (or timed out)."""
        done = 0
        while done < n:
            event = await self.next(deadline)
            yield event
            if _kind(event) == "error":
                return
            done += _kind(event) == "done"


def _kind(event) -> str:
    if hasattr(event, "token_ids"):
        return "token"
    return "done" if hasattr(event, "finish_reason") else "error"


def _timed_out():
    from decodekit.serve.engine import ErrorEvent

    return ErrorEvent("the request timed out (its timeout, or the server's --timeout) and was cancelled",
                      "timeout")


def _event_error(event) -> tuple[int, dict]:
    status, kind = ERROR_STATUS.get(getattr(event, "code", None), (500, "server_error"))
    return status, error_body(event.message, kind=kind, code=getattr(event, "code", None))


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, kind, code), status_code=status)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else _dumps(data)}\n\n"


def _finite(value):
    """``value`` with non-finite floats replaced (JSON has none): +-inf -> +-9999.0 (OpenAI's
    -9999 for an impossible token's log-probability), NaN -> None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(9999.0, value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _dumps(body) -> str:
    try:
        return json.dumps(body, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(body))


def _json_response(body, status: int = 200) -> Response:
    """A JSON response whose floats are all finite."""
    return Response(_dumps(body), status_code=status, media_type="application/json")


class Server:
    """The app's state and handlers: one engine, its tokenizer and the model's name."""

    def __init__(self, engine, tokenizer, model_id: str, limits: Limits, api_key: str | None, grace: float):
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self.limits, self.api_key = limits, api_key
        self.drain = Drain(engine, grace)
        self.http = prom.HttpCounters()

    def authorized(self, request: Request) -> bool:
        if not self.api_key or not request.url.path.startswith(PROTECTED):
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def complete(self, request: Request, parse) -> Response:
        """Parse, check and submit one request; answer streaming or whole."""
        if self.drain.draining:
            return _error(503, "the server is shutting down; send the request to another one",
                          kind="server_error", code=SHUTDOWN_CODE)
        origins = {}
        try:
            body = _json(await read_body(request, self.limits.max_body_bytes))
            parsed: Parsed = await run_in_threadpool(parse, body, self.tokenizer, self.model_id)
            origins = parsed.origins
            check_parsed(parsed, body, self.limits)
            timeout = request_timeout(body, self.limits)
            deadline = None if timeout is None else time.monotonic() + timeout
            return await self._submit(request, parsed, deadline)
        except LimitError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        except DecodeKitError as exc:
            message = str(exc)
            param = exc.param if isinstance(exc, FieldError) else error_param(message, origins)
            code = "model_not_found" if param == "model" and message.startswith("model must be") else None
            return _error(404 if code else 400, message, param, code=code)

    async def _submit(self, request: Request, parsed: Parsed, deadline: float | None) -> Response:
        from decodekit.serve.engine import EngineRequest, QueueFull

        events = EventQueue(asyncio.get_running_loop())
        try:
            handle = self.engine.submit(EngineRequest(parsed.prompt_ids, parsed.params), events)
        except QueueFull as exc:
            raise busy(str(exc), self.limits) from None
        answer = Answer(parsed, self.tokenizer)
        if parsed.stream:
            return StreamingResponse(self._stream(parsed, answer, events, handle, deadline),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, parsed, answer, (events, deadline), handle)

    async def _stream(self, parsed: Parsed, answer: Answer, events: EventQueue, handle, deadline):
        """SSE chunks; a client that disconnects (the generator is closed) cancels its rows; an
        error (the request failed, timed out, or the server shut down) is an error event."""
        finished = False
        try:
            async for event in events.events(parsed.n, deadline):
                kind = _kind(event)
                if kind == "error":
                    handle.cancel()  # a timeout: its rows leave at the next step
                    yield _sse(_event_error(event)[1])
                    break
                yield _sse(answer.token_chunk(event) if kind == "token" else answer.done_chunk(event))
            finished = True
            if parsed.include_usage:
                yield _sse(answer.usage_chunk())
            yield _sse("[DONE]")
        finally:
            if not finished:
                handle.cancel()

    async def _whole(self, request: Request, parsed: Parsed, answer: Answer, waiting, handle):
        """Wait for every choice; poll for a client that went away meanwhile."""
        events, deadline = waiting
        remaining, looked = parsed.n, time.monotonic()
        while remaining:
            event = await events.next(deadline, DISCONNECT_POLL_S)
            if time.monotonic() - looked >= DISCONNECT_POLL_S:  # idle or not: tokens may keep coming
                looked = time.monotonic()
                if await request.is_disconnected():
                    handle.cancel()
                    return Response(status_code=499)
            if event is None:
                continue
            kind = _kind(event)
            if kind == "error":
                handle.cancel()  # a timeout: its rows leave at the next step
                status, body = _event_error(event)
                return JSONResponse(body, status_code=status)
            if kind == "token":
                answer.token_chunk(event)
            else:
                answer.done_chunk(event)
                remaining -= 1
        return _json_response(answer.body())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "decodekit"}]}

    def health(self) -> JSONResponse:
        """Liveness and load: 200 ``ok`` (503 ``draining``), queue length and running rows."""
        body = {"status": "draining" if self.drain.draining else "ok", "model": self.model_id}
        if self.engine is not None:
            metrics = self.engine.metrics()
            body.update(queue_length=metrics["queue_depth"], running_requests=metrics["requests_running"],
                        running_rows=metrics["batch_size"], max_batch_size=self.engine.max_batch_size,
                        max_queue=self.engine.max_queue)
        return JSONResponse(body, status_code=503 if self.drain.draining else 200)


def _json(raw: bytes):
    """The body parsed as JSON (400 if it is not)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise LimitError(400, "the body must be a JSON object") from None


class Guard:
    """Pure ASGI middleware (streams and client disconnects pass through untouched): the API
    key, a 500 body for an unexpected exception (that request only), responses counted."""

    def __init__(self, app, server: Server, routes: set[str]):
        self.app, self.server, self.routes = app, server, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        path = request.url.path
        status = {}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if not self.server.authorized(request):
                await _error(401, "missing or wrong API key: send Authorization: Bearer <key>",
                             code="invalid_api_key")(scope, receive, counted)
                return
            try:
                await self.app(scope, receive, counted)
            except Exception as exc:  # one request's failure is its own
                if "code" in status:
                    raise
                await _error(500, f"internal error: {type(exc).__name__}: {exc}",
                             kind="server_error")(scope, receive, counted)
        finally:
            self.server.http.add(path if path in self.routes else "other", status.get("code", 499))


def _playground() -> str:
    return resources.files("decodekit.serve").joinpath("static/playground.html").read_text(encoding="utf-8")


def create_app(engine, tokenizer, model_id: str, *, context: int | None = None,
               api_key: str | None = None, limits: Limits | None = None,
               grace: float = DEFAULT_GRACE_S) -> FastAPI:
    """The FastAPI app over a started ``Engine`` (see the module docstring). ``limits``: what is
    refused before queueing and the server's timeout (``context`` fills its context);
    ``grace``: seconds running requests get to finish on SIGTERM (``serve.shutdown``)."""
    limits = limits or Limits()
    if context is not None:
        limits = replace(limits, context=context)
    server = Server(engine, tokenizer, model_id, limits, api_key, grace)
    app = FastAPI(title="decodekit", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server
    routes = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/decoding/options", "/health",
              "/metrics", "/"}

    app.add_middleware(Guard, server=server, routes=routes)

    @app.post("/v1/chat/completions", **openapi.completion_route(openapi.chat_body(limits)))
    async def chat_completions(request: Request):
        return await server.complete(request, parse_chat)

    @app.post("/v1/completions", **openapi.completion_route(openapi.completion_body(limits)))
    async def completions(request: Request):
        return await server.complete(request, parse_completion)

    @app.get("/v1/models", **openapi.get_route(openapi.MODELS))
    async def models():
        return server.models()

    @app.get("/v1/decoding/options", **openapi.get_route(openapi.DECODING_OPTIONS))
    async def decoding_options():
        """Every strategy's options and the processor knobs as JSON Schema (the playground's forms)."""
        return decoding_schema()

    @app.get("/health", **openapi.health_route())
    async def health():
        return server.health()

    @app.get("/metrics", **openapi.get_route(None, prom.CONTENT_TYPE.split(";")[0]))
    async def metrics():
        return Response(prom.render(engine.metrics(), server.http), media_type=prom.CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(_playground())

    return app


class BackgroundServer:
    """uvicorn in a daemon thread (tests, benchmarks): ``port=0`` picks a free port, read back
    from ``.port`` once ``start()`` returns."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run(args) -> int:
    """``decodekit serve``: load the model, start the engine, serve until interrupted."""
    import uvicorn

    from decodekit.model_info import context_length
    from decodekit.models import DEFAULT_MODEL, default_dtype_note, load_model
    from decodekit.serve.engine import Engine

    cap_malloc_arenas()  # before any thread starts: RSS stays flat under a long soak
    if args.dtype is None:
        print(f"decodekit serve: {default_dtype_note(args.device)}", flush=True)
    model, tokenizer = load_model(args.model_path, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    engine.start()
    print(f"decodekit serve: measuring forward costs for batch sizes up to {args.max_batch_size} "
          "(once, before the first request: ~20 s for 16 rows of a 135M model on 2 CPU cores)", flush=True)
    model_id = args.model_path or DEFAULT_MODEL
    limits = Limits(max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes, timeout=args.timeout)
    app = create_app(engine, tokenizer, model_id, context=context_length(model), api_key=args.api_key,
                     limits=limits, grace=args.shutdown_grace)
    print(f"decodekit serve: {model_id} on http://{args.host}:{args.port} (playground at /, "
          f"OpenAI API at /v1)", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    try:
        graceful_server(config, app.state.server.drain).run()
    finally:
        engine.stop()
    return 0
