"""The OpenAPI description of the server's endpoints (``/openapi.json``): request bodies and
every status each endpoint answers, with OpenAI's error body.

The handlers read raw requests (the protocol module checks them and names the bad field), so
the bodies are described here as JSON Schema; ``tests/test_serve_fuzz.py`` fuzzes the server
from this schema (schemathesis). Limits (``max_tokens_limit``) are part of the schema.
"""

from __future__ import annotations

from decodekit.serve.limits import Limits
from decodekit.serve.protocol import MAX_N, MAX_STOP, MIN_TEMPERATURE, ROLES
from decodekit.validation import MAX_SEED

__all__ = ["completion_route", "get_route", "health_route", "chat_body", "completion_body", "ERROR",
           "MODELS"]

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

WHY = {
    400: "a bad field (``param`` names it), a prompt over the context, max_tokens over the limit",
    401: "missing or wrong API key", 404: "an unknown model", 408: "the request's timeout passed",
    413: "the body is over the server's --max_body_bytes",
    429: "the queue is full (Retry-After says when to retry)",
    500: "the request failed while decoding (never for client input)",
    503: "the server is shutting down",
}
COMPLETION_ERRORS = (400, 401, 404, 408, 413, 429, 500, 503)


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _common(limits: Limits) -> dict:
    max_tokens = {"type": "integer", "minimum": 1}
    if limits.max_tokens_limit is not None:
        max_tokens["maximum"] = limits.max_tokens_limit
    number = {"type": "number"}
    return {
        "model": _nullable({"type": "string"}),  # null is absent: this server's model
        "max_tokens": _nullable(max_tokens),
        "temperature": _nullable({"anyOf": [{"const": 0}, {**number, "minimum": MIN_TEMPERATURE, "maximum": 2}]}),
        "top_p": _nullable({**number, "exclusiveMinimum": 0, "maximum": 1}),
        "seed": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_SEED}),
        "stop": _nullable({"anyOf": [{"type": "string", "minLength": 1},
                                     {"type": "array", "items": {"type": "string", "minLength": 1},
                                      "maxItems": MAX_STOP}]}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
        "presence_penalty": _nullable({**number, "minimum": -2, "maximum": 2}),
        "frequency_penalty": _nullable({**number, "minimum": -2, "maximum": 2}),
        "logit_bias": _nullable({"type": "object", "additionalProperties": {**number, "minimum": -100,
                                                                           "maximum": 100}}),
        "decoding": _nullable({"type": "object", "description": "decodekit's extension: strategy and its options",
                               "properties": {"strategy": {"type": ["string", "null"]}}}),
        "timeout": _nullable({**number, "exclusiveMinimum": 0, "description": "seconds, queueing included"}),
        "user": _nullable({"type": "string"}),
        # accepted and ignored, whatever their value
        "metadata": {}, "store": {}, "service_tier": {}, "parallel_tool_calls": {},
    }


def _message() -> dict:
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    return {"type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": list(ROLES)},
                           "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}}


def chat_body(limits: Limits) -> dict:
    props = {**_common(limits), "messages": {"type": "array", "minItems": 1, "items": _message()},
             "logprobs": _nullable({"type": "boolean"}),
             "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
             "max_completion_tokens": _common(limits)["max_tokens"]}
    return {"type": "object", "required": ["messages"], "properties": props, "additionalProperties": False}


def completion_body(limits: Limits) -> dict:
    props = {**_common(limits), "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                                                      {"type": "array", "items": {"type": "string", "minLength": 1},
                                                       "minItems": 1, "maxItems": 1}]},
             "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20})}
    return {"type": "object", "required": ["prompt"], "properties": props, "additionalProperties": False}


def _errors(statuses) -> dict:
    return {code: {"description": WHY[code], "content": {"application/json": {"schema": ERROR}}}
            for code in statuses}


COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
              "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                             "choices": {"type": "array"}, "usage": {"type": "object"}}}


# one server-sent event: data is a chunk's JSON, an error body's JSON, or [DONE]
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}


def completion_route(body: dict) -> dict:
    """``app.post`` keyword arguments: the request body and every status."""
    ok = {"description": "the completion; with stream: true, server-sent events ending data: [DONE]",
          "content": {"application/json": {"schema": COMPLETION},
                      "text/event-stream": {"schema": SSE_EVENT}}}
    return {"responses": {200: ok, **_errors(COMPLETION_ERRORS)},
            "openapi_extra": {"requestBody": {"required": True,
                                              "content": {"application/json": {"schema": body}}}}}


def get_route(ok_schema: dict | None, media: str = "application/json", errors=(401,)) -> dict:
    """``app.get`` keyword arguments: the 200 and the errors."""
    ok = {"description": "OK", "content": {media: {"schema": ok_schema or {"type": "string"}}}}
    return {"responses": {200: ok, **_errors(errors)}}


HEALTH = {"type": "object", "required": ["status", "model"],
          "properties": {"status": {"enum": ["ok", "draining"]}, "model": {"type": "string"},
                         "queue_length": {"type": "integer"}, "running_requests": {"type": "integer"},
                         "running_rows": {"type": "integer"}}}
DECODING_OPTIONS = {"type": "object", "required": ["strategies", "knobs"],
                    "properties": {"strategies": {"type": "object"}, "knobs": {"type": "object"}}}
MODELS = {"type": "object", "required": ["object", "data"],
          "properties": {"object": {"const": "list"}, "data": {"type": "array"}}}


def health_route() -> dict:
    ok = get_route(HEALTH, errors=())
    ok["responses"][503] = {"description": "draining: the server is shutting down",
                            "content": {"application/json": {"schema": HEALTH}}}
    return ok
