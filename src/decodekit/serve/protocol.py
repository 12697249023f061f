"""The OpenAI wire format: requests in, ``EngineRequest`` parameters out; engine events back
into ``chat.completion`` / ``text_completion`` responses and server-sent-event chunks.

A request becomes ``Parsed``: the prompt's token ids and ``params``, exactly the keyword
arguments ``decodekit.generate`` takes. OpenAI's names map onto transformers'/decodekit's:
``max_tokens`` -> ``max_new_tokens``, ``stop`` -> ``stop_strings``, ``n`` ->
``num_return_sequences``, ``logprobs``/``top_logprobs`` -> ``logprobs``. The ``decoding``
extension object holds ``strategy`` and that strategy's options, validated by the same
``Options`` as the CLI (``strategies.build_options``), plus the logits-processor knobs.

Errors are ``DecodeKitError`` (one line naming the field); ``error_param`` finds which
OpenAI field a message is about, for the error body's ``param``.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from decodekit.detok import IncrementalDetokenizer
from decodekit.io import encode_text
from decodekit.processors import PROCESSOR_OPTIONS
from decodekit.strategies import build_options, get_strategy
from decodekit.validation import MAX_SEED, DecodeKitError, check_float, check_int, check_top_p

__all__ = ["Parsed", "FieldError", "parse_chat", "parse_completion", "encode_chat", "error_param", "error_body",
           "Choice", "Response"]

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
    build_options(strategy, options, knobs)  # the CLI's validation: unknown options named
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
    """``response_format`` or one of vLLM's ``guided_*`` fields -> a checked constraint keyword."""
    from decodekit.constraints import ConstraintSpec

    given = {}
    if body.get("response_format") is not None:
        given = _response_format(body["response_format"])
        origins.update({k: "response_format" for k in given})
    for name, keyword in GUIDED.items():
        if body.get(name) is not None:
            if keyword in given:
                raise DecodeKitError(f"give one of response_format and {name}, not both")
            given[keyword], origins[keyword] = body[name], name
    ConstraintSpec.from_options(**given)
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
    _set_logprobs(parsed, "top_logprobs")
    return parsed


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
    _set_logprobs(parsed, "logprobs")
    return parsed


def _set_logprobs(parsed: Parsed, name: str) -> None:
    if parsed.logprobs is not None:
        parsed.params["logprobs"] = parsed.logprobs
        parsed.origins["logprobs"] = name


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


class Choice:
    """One choice's text as its tokens arrive: incremental detokenization, the OpenAI
    treatment of ``stop`` (the text ends before the stop sequence, which is never streamed),
    per-token records for the ``decodekit`` extension and logprobs."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text, self.sent = "", 0  # text so far (cut at a stop sequence) and how much was given out
        self.stopped = False
        self.token_ids: list[int] = []
        self.tokens: list[dict] = []  # {"id", "text", "kind", "logprob"}
        self.top: list[list[dict]] = []  # alternatives per token (when asked)
        self.finish_reason: str | None = None
        self.stats: dict = {}

    def add(self, event) -> tuple[str, list[dict]]:
        """A ``TokenEvent`` -> (text safe to send now, its token records)."""
        new = []
        for i, tok in enumerate(event.token_ids):
            piece = self.detok.push([tok])
            logprob = event.logprobs[i] if event.logprobs else None
            record = {"id": int(tok), "text": piece, "kind": event.kinds[i] if event.kinds else "plain",
                      "logprob": logprob}
            self.token_ids.append(int(tok))
            new.append(record)
            if event.top_logprobs:
                self.top.append(event.top_logprobs[i])
            self._append(piece)
        self.tokens += new
        return self._ready(), new

    def _append(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _ready(self, final: bool = False) -> str:
        hold = 0
        if not (final or self.stopped):  # a tail that may begin a stop sequence waits
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self, event) -> str:
        """A ``DoneEvent`` -> the text still held back."""
        self._append(self.detok.flush())
        self.finish_reason = "stop" if self.stopped else event.finish_reason
        self.stats = dict(event.stats or {})
        if isinstance(self.stats.get("beams"), list):  # the playground shows beams as text
            self.stats["beams"] = [{**b, "text": self.tokenizer.decode(b.get("token_ids", []), skip_special_tokens=True)}
                                   for b in self.stats["beams"]]
        return self._ready(final=True)

    def chat_logprobs(self, records: list[dict], start: int) -> dict:
        return {"content": [self._entry(r, start + i) for i, r in enumerate(records)]}

    def _entry(self, record: dict, position: int) -> dict:
        text = self.tokenizer.decode([record["id"]])
        alternatives = self.top[position] if position < len(self.top) else []
        return {"token": text, "logprob": record["logprob"], "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.tokenizer.decode([a["token_id"]])), "logprob": a["logprob"],
                                  "bytes": list(t.encode())} for a in alternatives]}

    def text_logprobs(self, records: list[dict], start: int) -> dict:
        entries = [self._entry(r, start + i) for i, r in enumerate(records)]
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries]}


class Response:
    """Builds the chunks and the final body of one request (``Parsed``)."""

    def __init__(self, parsed: Parsed, tokenizer):
        self.parsed = parsed
        prefix = "chatcmpl" if parsed.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if parsed.kind == "chat" else "text_completion"
        self.choices = [Choice(tokenizer, parsed.stop) for _ in range(parsed.n)]
        self.started: set[int] = set()

    def _chunk(self, choice: dict) -> dict:
        kind = "chat.completion.chunk" if self.parsed.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.parsed.model,
                "choices": [choice]}

    def _piece(self, index: int, text: str) -> dict:
        if self.parsed.kind == "text":
            return {"index": index, "text": text, "logprobs": None, "finish_reason": None}
        delta = {"content": text}
        if index not in self.started:
            self.started.add(index)
            delta["role"] = "assistant"
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def token_chunk(self, event) -> dict:
        choice = self.choices[event.index]
        start = len(choice.tokens)
        text, records = choice.add(event)
        out = self._piece(event.index, text)
        if self.parsed.logprobs is not None:
            log = choice.chat_logprobs if self.parsed.kind == "chat" else choice.text_logprobs
            out["logprobs"] = log(records, start)
        out["decodekit"] = {"tokens": records}
        return self._chunk(out)

    def done_chunk(self, event) -> dict:
        choice = self.choices[event.index]
        out = self._piece(event.index, choice.finish(event))
        out.update(finish_reason=choice.finish_reason, decoding_stats=choice.stats)
        return self._chunk(out)

    def usage(self) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        prompt = len(self.parsed.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self._chunk({})["object"], "created": self.created,
                "model": self.parsed.model, "choices": [], "usage": self.usage()}

    def body(self) -> dict:
        """The non-streaming response, once every choice is done."""
        choices = []
        for i, c in enumerate(self.choices):
            logprobs = None
            if self.parsed.logprobs is not None:
                logprobs = (c.chat_logprobs if self.parsed.kind == "chat" else c.text_logprobs)(c.tokens, 0)
            entry = {"index": i, "logprobs": logprobs, "finish_reason": c.finish_reason,
                     "decoding_stats": c.stats, "decodekit": {"tokens": c.tokens}}
            if self.parsed.kind == "chat":
                entry["message"] = {"role": "assistant", "content": c.text}
            else:
                entry["text"] = c.text
            choices.append(entry)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.parsed.model,
                "choices": choices, "usage": self.usage(), "decoding_stats": self.choices[0].stats}
