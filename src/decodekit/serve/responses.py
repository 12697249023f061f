"""The OpenAI wire format, responses: engine events become ``chat.completion`` /
``text_completion`` responses and server-sent-event chunks (``Choice``: one choice's text as
its tokens arrive, OpenAI's ``stop`` treatment, logprobs; ``Response``: the envelope)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from decodekit.detok import IncrementalDetokenizer

if TYPE_CHECKING:
    from decodekit.serve.protocol import Parsed

__all__ = ["Choice", "Response"]


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
