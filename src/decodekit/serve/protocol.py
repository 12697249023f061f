"""The OpenAI wire format, requests: a body in, ``EngineRequest`` parameters out (the
responses are ``decodekit.serve.responses``).

A request becomes ``Parsed``: the prompt's token ids and ``params``, exactly the keyword
arguments ``decodekit.generate`` takes. OpenAI's names map onto transformers'/decodekit's:
``max_tokens`` -> ``max_new_tokens``, ``stop`` -> ``stop_strings``, ``n`` ->
``num_return_sequences``, ``logprobs``/``top_logprobs`` -> ``logprobs``. The ``decoding``
extension object holds ``strategy`` and that strategy's options, plus the logits-processor
knobs; everything is checked by ``GenerateParams.from_kwargs``, as ``generate`` and the CLI check it.

Errors are ``DecodeKitError`` (one line naming the field); ``error_param`` finds which
OpenAI field a message is about, for the error body's ``param``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from decodekit.io import encode_text
from decodekit.params import GenerateParams
from decodekit.processors import PROCESSOR_OPTIONS
from decodekit.strategies import get_strategy
from decodekit.validation import MAX_SEED, DecodeKitError, check_float, check_int, check_top_p

__all__ = ["Parsed", "FieldError", "parse_chat", "parse_completion", "encode_chat", "error_param", "error_body"]

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16
MIN_TEMPERATURE = 1e-6  # a smaller temperature > 0 overflows the scaled scores (a float32 0 below 1e-45)
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choices",
          "guided_grammar": "grammar"}  # vLLM's structured-output fields -> generate's
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
                 "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "decoding",
                 "response_format", *GUIDED, "timeout"}  # timeout: seconds, checked by serve.limits
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
TEXT_FIELDS = COMMON_FIELDS | {"prompt", "logprobs"}
SAMPLING = ("temperature", "top_k", "top_p")


@dataclass
class Parsed:
    """One checked OpenAI request: what the engine runs and how to answer."""

    kind: str  # "chat" | "text"
    model: str
    prompt_ids: list[int]
    params: dict  # decodekit.generate keyword arguments
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # alternatives per token when the client asked for logprobs
    origins: dict = field(default_factory=dict)  # generate kwarg -> OpenAI field, for errors


def _field(body: dict, name: str, kind, default=None):
    value = body.get(name, default)
    if value is None or value is default:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise DecodeKitError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise DecodeKitError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


def _check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise DecodeKitError("body must be a JSON object")
    unknown = sorted(set(body) - allowed - IGNORED_FIELDS)
    if unknown:
        raise FieldError(f"{unknown[0]} is not supported by this server; supported fields: "
                         f"{', '.join(sorted(allowed))}", unknown[0])
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise FieldError(f"user must be a string, got {body['user']!r}", "user")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise DecodeKitError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    if len(stops) > MAX_STOP:
        raise DecodeKitError(f"stop must hold at most {MAX_STOP} strings, got {len(stops)}")
    return list(stops)


def _decoding(body: dict, origins: dict) -> tuple[str | None, dict]:
    """The ``decoding`` extension: ``(strategy or None, its options and processor knobs)``."""
    decoding = {} if body.get("decoding") is None else body["decoding"]
    if not isinstance(decoding, dict):
        raise DecodeKitError(f"decoding must be an object such as {{\"strategy\": \"prompt_lookup\", "
                             f"\"gamma\": 5}}, got {decoding!r}")
    options = {k: v for k, v in decoding.items() if k != "strategy"}
    origins.update({k: f"decoding.{k}" for k in decoding})
    strategy = decoding.get("strategy")
    if strategy is not None:
        if not isinstance(strategy, str):
            raise DecodeKitError(f"strategy must be a string, got {strategy!r}")
        get_strategy(strategy)
    return strategy, options


def _choose_strategy(strategy: str | None, knobs: dict) -> str:
    """No strategy given: greedy, or sample when a temperature > 0 / top_p < 1 asks to sample
    (OpenAI's meaning); temperature 0 and top_p 1 are then dropped as no-ops."""
    if strategy is not None:
        return strategy
    if knobs.get("top_p") == 1.0:
        knobs.pop("top_p")
    if knobs.get("temperature") == 0:
        knobs.pop("temperature")
    return "sample" if knobs else "greedy"


def _params(body: dict, default_max: int, origins: dict) -> dict:
    """OpenAI sampling fields + ``decoding`` -> ``generate`` keyword arguments (validated by the
    strategy's ``Options``); ``origins`` learns where each came from."""
    strategy, options = _decoding(body, origins)
    knobs = {k: options.pop(k) for k in SAMPLING if k in options}
    seed = options.pop("seed", body.get("seed"))  # generate's, so also welcome in decoding
    for name in ("temperature", "top_p"):
        value = _field(body, name, float)
        if value is not None:
            knobs[name], origins[name] = value, name
    if "temperature" in knobs:
        check_float("temperature", knobs["temperature"], min_value=0.0, max_value=2.0)
        if 0 < knobs["temperature"] < MIN_TEMPERATURE:  # the scores would overflow to inf
            raise DecodeKitError(f"temperature must be 0 or at least {MIN_TEMPERATURE:g}, got {knobs['temperature']!r}")
    if "top_p" in knobs:
        check_top_p(knobs["top_p"])
    strategy = _choose_strategy(strategy, knobs)
    processors = {k: options.pop(k) for k in list(options) if k in PROCESSOR_OPTIONS}
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
        if body.get(name) is not None:
            processors[name], origins[name] = body[name], name
    if isinstance(processors.get("logit_bias"), dict):
        processors["logit_bias"] = _logit_bias(processors["logit_bias"])
    n = check_int("n", body.get("n", 1), min_value=1, max_value=MAX_N)
    if n > 1:
        options["num_return_sequences"] = n
    if body.get("max_tokens") is not None:  # checked even when max_completion_tokens wins
        check_int("max_tokens", body["max_tokens"], min_value=1)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
    params = dict(strategy=strategy, max_new_tokens=check_int("max_tokens", max_tokens, min_value=1),
                  **{k: v for k, v in knobs.items()}, **options, **processors)
    if seed is not None:
        params["seed"] = check_int("seed", seed, min_value=0, max_value=MAX_SEED)
    return params


def _response_format(value) -> dict:
    """OpenAI's ``response_format`` -> generate's constraint keyword (``{}`` for text)."""
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise DecodeKitError("response_format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}, "
                             f"got {value!r}")
    if value["type"] == "text":
        return {}
    if value["type"] == "json_object":
        return {"json_object": True}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise DecodeKitError("response_format json_schema must be {\"name\": ..., \"schema\": {...}, "
                             f"\"strict\": true}}, got {spec!r}")
    if not isinstance(spec.get("strict", False), bool):
        raise DecodeKitError(f"response_format strict must be true or false, got {spec['strict']!r}")
    return {"json_schema": spec["schema"]}  # strict or not, the schema is enforced token by token


def _constraint(body: dict, origins: dict) -> dict:
    """``response_format`` or one of vLLM's ``guided_*`` fields -> a constraint keyword."""
    given = {}
    if body.get("response_format") is not None:
        given = _response_format(body["response_format"])
        origins.update({k: "response_format" for k in given})
    for name, keyword in GUIDED.items():
        if body.get(name) is not None:
            if keyword in given:
                raise DecodeKitError(f"give one of response_format and {name}, not both")
            given[keyword], origins[keyword] = body[name], name
    return given


def _logit_bias(bias: dict) -> dict:
    try:
        out = {int(k): v for k, v in bias.items()}
    except ValueError:
        raise DecodeKitError(f"logit_bias keys must be token ids, got {list(bias)!r}") from None
    for value in out.values():  # OpenAI's range; larger biases overflow the scores
        check_float("logit_bias", value, min_value=-100.0, max_value=100.0)
    return out


def _common(body: dict, kind: str, model_id: str, prompt_ids: list[int], default_max: int,
            origins: dict) -> Parsed:
    model = body.get("model", model_id)
    if model not in (model_id, None):
        raise DecodeKitError(f"model must be {model_id!r} (the model this server runs), got {model!r}")
    params = _params(body, default_max, origins)
    params.update(_constraint(body, origins))
    stop = _stop(body)
    if stop:
        params["stop_strings"] = stop
    stream_options = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(stream_options, dict):
        raise DecodeKitError(f"stream_options must be an object, got {stream_options!r}")
    if not isinstance(stream_options.get("include_usage", False), bool):
        raise DecodeKitError(f"stream_options.include_usage must be true or false, got {stream_options['include_usage']!r}")
    return Parsed(kind=kind, model=model_id, prompt_ids=prompt_ids, params=params,
                  n=params.get("num_return_sequences", 1), stream=bool(_field(body, "stream", bool)),
                  include_usage=bool(stream_options.get("include_usage")), stop=stop, origins=dict(origins))


class FieldError(DecodeKitError):
    """A bad request field: ``param`` is the OpenAI field's name (``decoding.gamma``)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def _named(parse):
    """Re-raise a parser's ``DecodeKitError`` as a ``FieldError`` naming the field."""

    def wrapper(body, tokenizer, model_id: str, **kwargs) -> Parsed:
        origins = dict(BASE_ORIGINS)
        try:
            return parse(body, tokenizer, model_id, origins, **kwargs)
        except FieldError:
            raise
        except DecodeKitError as exc:
            raise FieldError(str(exc), error_param(str(exc), origins)) from None

    wrapper.__doc__ = parse.__doc__
    return wrapper


BASE_ORIGINS = {"max_new_tokens": "max_tokens", "stop_strings": "stop", "num_return_sequences": "n",
                "strategy": "decoding.strategy"}


@_named
def parse_chat(body: dict, tokenizer, model_id: str, origins: dict, default_max: int = 256) -> Parsed:
    """A ``/v1/chat/completions`` body -> ``Parsed`` (chat template applied)."""
    _check_fields(body, CHAT_FIELDS)
    origins["prompt"] = "messages"
    messages = _messages(body.get("messages"))
    parsed = _common(body, "chat", model_id, encode_chat(tokenizer, messages), default_max, origins)
    if _field(body, "logprobs", bool):
        top = body.get("top_logprobs")
        parsed.logprobs = 0 if top is None else check_int("top_logprobs", top, min_value=0, max_value=20)
    elif body.get("top_logprobs") is not None:
        raise DecodeKitError("top_logprobs needs logprobs: true")
    return _checked(parsed, "top_logprobs")


@_named
def parse_completion(body: dict, tokenizer, model_id: str, origins: dict, default_max: int = 16) -> Parsed:
    """A ``/v1/completions`` body -> ``Parsed`` (the prompt tokenized as ``io.encode_prompts``
    does without a chat template: special-token text stays text)."""
    _check_fields(body, TEXT_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise DecodeKitError(f"prompt must be a non-empty string, got {prompt!r}")
    ids = encode_text(tokenizer, prompt, True, True)
    parsed = _common(body, "text", model_id, list(ids), default_max, origins)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        parsed.logprobs = check_int("logprobs", logprobs, min_value=0, max_value=20)
    return _checked(parsed, "logprobs")


def _checked(parsed: Parsed, name: str) -> Parsed:
    """``parsed`` with its logprobs (OpenAI field ``name``), its ``params`` checked by
    ``GenerateParams.from_kwargs``: the one model-free check ``generate``, the CLI and Ray make."""
    if parsed.logprobs is not None:
        parsed.params["logprobs"] = parsed.logprobs
        parsed.origins["logprobs"] = name
    GenerateParams.from_kwargs(**parsed.params)
    return parsed


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise DecodeKitError(f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise DecodeKitError(f"messages[{i}].content must be a string, got {content!r}")
    return content


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DecodeKitError(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, "
                             f"got {messages!r}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DecodeKitError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": _content(message, i)})
    return out


_PLACEHOLDER = "DecodekitMessage{}Placeholder"


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template's ids with every message's text tokenized as text, as
    ``io.encode_prompts`` does for one user turn: the template is rendered with placeholders to
    find where each message lands; the template's own special tokens are recognised, the
    messages' special-token text is split (a message cannot forge a turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DecodeKitError("messages: this model's tokenizer has no chat template; use /v1/completions")
    holders = [_PLACEHOLDER.format(i) for i in range(len(messages))]
    template = tokenizer.apply_chat_template(
        [{**m, "content": h} for m, h in zip(messages, holders)], add_generation_prompt=True, tokenize=False)
    pieces = re.split("(" + "|".join(holders) + ")", template)  # template, holder, template, ...
    if pieces[1::2] != holders:
        raise DecodeKitError("messages: cannot locate the messages in the chat template's text")
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content),
                      key=len, reverse=True)
    split_at = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
    ids, text = [], ""  # text: plain text waiting to be tokenized up to the next special token
    for i, piece in enumerate(pieces):
        if i % 2:
            text += messages[i // 2]["content"]
            continue
        parts = split_at.split(piece) if split_at else [piece]
        for j, part in enumerate(parts):
            if j % 2:  # a special token of the template
                ids += _encode(tokenizer, text, True) + _encode(tokenizer, part, False)
                text = ""
            else:
                text += part
    return ids + _encode(tokenizer, text, True)


def _encode(tokenizer, text: str, split: bool) -> list[int]:
    return encode_text(tokenizer, text, False, split) if text else []


_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9.\[\]]*")


def error_param(message: str, origins: dict) -> str | None:
    """The OpenAI field an error message is about: its first word when that is a field,
    else the first field it names (``unknown option(s) x`` -> ``decoding.x``)."""
    words = [w.rstrip(".") for w in _WORD.findall(message)]
    unknown = re.match(r"unknown option\(s\) ([A-Za-z_0-9]+)", message)
    if unknown:
        return f"decoding.{unknown.group(1)}"
    for word in words[:1] + words:
        if word in origins:
            return origins[word]
        if word in CHAT_FIELDS | TEXT_FIELDS or word.startswith("messages["):
            return word
        if word.split(".")[0] == "decoding" or word in ("top_logprobs",):
            return word
    return None


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
