"""``decodekit serve`` under pressure, over real loopback HTTP with a tiny random Llama (the
bundled tokenizer): 429 with Retry-After, limits refused before queueing (400/413), timeouts,
client disconnects freeing rows, a failing request (500 / an error event) and ``/v1/completions``
with n=2, logprobs and stop through the official ``openai`` client."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import decodekit  # noqa: E402
from decodekit.io import encode_text  # noqa: E402
from decodekit.serve.app import BackgroundServer, create_app  # noqa: E402
from decodekit.serve.engine import Engine, EngineRequest  # noqa: E402
from decodekit.serve.limits import Limits  # noqa: E402
from decodekit.strategies.session import DecodeSession  # noqa: E402

from conftest import tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny"
CONTEXT = 256  # tiny_llama's max_position_embeddings


@pytest.fixture(scope="module")
def tiny(bundled_tokenizer):
    tok = bundled_tokenizer
    model = tiny_llama(seed=3, vocab=len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


@contextlib.contextmanager
def serving(tiny, start: bool = True, max_queue: int = 64, limits: Limits | None = None):
    """(url, engine) of a server on a free loopback port; the engine not started if ``start`` is False."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch_size=4, max_queue=max_queue)
    if start:
        engine.start()
    server = BackgroundServer(create_app(engine, tok, MODEL, context=CONTEXT, limits=limits)).start()
    try:
        yield server.url, engine
    finally:
        server.stop()
        engine.stop()


def post(url: str, path: str, body, timeout: float = 60):
    """(status, headers, parsed JSON or SSE text) of a POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    text = raw.decode()
    is_json = headers.get("content-type", "").startswith("application/json")
    return status, headers, json.loads(text) if is_json else text


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def chat(max_tokens: int = 8, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens,
            **extra}


def wait_until(check, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


def sse_error(text: str) -> dict:
    """The error event of a stream (there must be one)."""
    return next(e["error"] for e in sse_events(text) if isinstance(e, dict) and "error" in e)


def test_full_queue_is_429_with_retry_after_and_health_reports_it(tiny):
    with serving(tiny, start=False, max_queue=1) as (url, engine):
        engine.submit(EngineRequest([5, 6, 7], dict(max_new_tokens=2)), lambda event: None)
        status, headers, body = post(url, "/v1/chat/completions", chat())
        assert status == 429 and headers["Retry-After"] == "1"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
        health = get(url, "/health")
        assert health["status"] == "ok" and health["queue_length"] == 1 and health["running_rows"] == 0


def test_limits_are_refused_before_queueing(tiny):
    with serving(tiny, start=False, limits=Limits(max_tokens_limit=8, max_body_bytes=4096)) as (url, engine):
        status, _, body = post(url, "/v1/chat/completions", chat(max_tokens=9))
        assert status == 400 and body["error"]["param"] == "max_tokens" and "8" in body["error"]["message"]
        status, _, body = post(url, "/v1/completions", {"prompt": "word " * 1000})
        assert status == 413 and body["error"]["code"] == "body_too_large"
        status, _, body = post(url, "/v1/completions", {"prompt": "word " * 300, "max_tokens": 4})
        assert status == 400 and body["error"]["param"] == "prompt" and "context" in body["error"]["message"]
        status, _, body = post(url, "/v1/chat/completions", chat(timeout=-1))
        assert status == 400 and body["error"]["param"] == "timeout"
        status, _, body = post(url, "/v1/chat/completions", b"[" * 5000)
        assert status == 413
        status, _, body = post(url, "/v1/chat/completions", b"[" * 4000)  # nested past json's recursion
        assert status == 400 and body["error"]["message"] == "the body must be a JSON object"
        for decoding, param in [({"strategy": "beam", "num_beams": 10**6}, "decoding.num_beams"),
                                ({"strategy": "sample", "num_return_sequences": 10**6}, "decoding.num_return_sequences"),
                                ({"strategy": "eis", "top_k": 100}, "decoding.top_k"),
                                ({"strategy": "speculative", "drafter": "/etc"}, "decoding.drafter")]:
            status, _, body = post(url, "/v1/chat/completions", chat(decoding=decoding))
            assert status == 400 and body["error"]["param"] == param, body  # one request cannot exhaust memory
        assert engine.metrics()["requests_total"] == 0  # nothing was queued


def test_timeouts_cancel_with_a_clear_reason(tiny):
    """The engine is not running: requests wait in the queue until their timeout."""
    with serving(tiny, start=False, limits=Limits(timeout=0.3)) as (url, engine):
        status, _, body = post(url, "/v1/chat/completions", chat(timeout=0.2))
        assert status == 408 and body["error"]["code"] == "timeout" and "timed out" in body["error"]["message"]
        status, _, body = post(url, "/v1/chat/completions", chat())  # the server's --timeout
        assert status == 408 and body["error"]["code"] == "timeout"
        status, _, text = post(url, "/v1/chat/completions", chat(stream=True, timeout=0.2))
        assert status == 200 and sse_error(text)["code"] == "timeout"
        assert engine.metrics()["queue_depth"] == 3
        engine.start()  # the cancelled requests leave at admission, never decoded
        wait_until(lambda: engine.metrics()["requests_running"] == 0 and engine.metrics()["queue_depth"] == 0)
        assert engine.metrics()["generated_tokens_total"] == 0


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decoding step takes >= 20 ms: a 200-token request outlives a disconnect."""
    step = DecodeSession.step

    def slow(session, skip=False):
        time.sleep(0.02)
        return step(session, skip)

    monkeypatch.setattr(DecodeSession, "step", slow)


def open_request(url: str, body: dict) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def test_disconnect_frees_rows(tiny, slow_steps):
    long = chat(max_tokens=200, decoding={"ignore_eos": True})
    with serving(tiny) as (url, engine):
        stream = open_request(url, {**long, "stream": True})
        response = stream.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        whole = open_request(url, long)  # not streamed: the server polls for the disconnect
        wait_until(lambda: engine.metrics()["batch_size"] == 2)
        stream.close()
        whole.close()
        wait_until(lambda: get(url, "/health")["running_rows"] == 0)
        health = get(url, "/health")
        assert health["running_requests"] == 0 and health["queue_length"] == 0
        assert engine.metrics()["generated_tokens_total"] < 200  # neither ran to its end
        status, _, body = post(url, "/v1/chat/completions", chat(max_tokens=6))
        assert status == 200 and body["choices"][0]["finish_reason"]


def test_a_failing_request_is_500_or_an_error_event(tiny, monkeypatch):
    from decodekit.strategies.ngram import PromptLookupDrafter

    candidates = PromptLookupDrafter.candidates

    def flaky(self, i, history, k):
        if self.max_ngram == 4:
            raise ValueError("drafter failed")
        return candidates(self, i, history, k)

    monkeypatch.setattr(PromptLookupDrafter, "candidates", flaky)
    bad = chat(decoding={"strategy": "prompt_lookup", "ngram_n": 4})
    with serving(tiny) as (url, engine):
        status, _, body = post(url, "/v1/chat/completions", chat(logit_bias={"5": 1e308}))
        assert status == 400 and body["error"]["param"] == "logit_bias"
        too_deep = chat(decoding={"strategy": "speculative", "drafter": "layers:1000"})
        status, _, body = post(url, "/v1/chat/completions", too_deep)  # found when it starts: still a 400
        assert status == 400 and body["error"]["type"] == "invalid_request_error" and "layers" in body["error"]["message"]
        status, _, body = post(url, "/v1/chat/completions", bad)
        assert status == 500 and body["error"]["type"] == "server_error"
        assert "drafter failed" in body["error"]["message"]
        status, _, text = post(url, "/v1/chat/completions", {**bad, "stream": True})
        assert status == 200 and "drafter failed" in sse_error(text)["message"]
        status, _, body = post(url, "/v1/chat/completions", chat())
        assert status == 200


def test_completions_n2_logprobs_stop_through_openai(tiny):
    model, tok = tiny
    prompt = "The quick brown fox"
    ids = encode_text(tok, prompt, True, True)
    offline = decodekit.generate(model, [list(ids)], max_new_tokens=12, ignore_eos=True)
    full = tok.decode(offline.sequences[0], skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip() and full.find(stop) > 0
    with serving(tiny) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                          extra_body={"decoding": {"ignore_eos": True}})
        assert plain.choices[0].text == full
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, n=2, logprobs=2, stop=[stop],
                                          temperature=1e-4, seed=1, extra_body={"decoding": {"ignore_eos": True}})
    assert len(reply.choices) == 2
    for choice in reply.choices:  # sampling at temperature 1e-4: the greedy text (a tie would need 1e-4 logits apart)
        assert choice.text == full[: full.find(stop)] and choice.finish_reason == "stop"
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
        assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert reply.usage.completion_tokens >= 2


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "0"], "--timeout"), (["--shutdown_grace", "-1"], "--shutdown_grace"),
    (["--max_body_bytes", "10"], "max_body_bytes"), (["--max_tokens_limit", "0"], "max_tokens_limit"),
])
def test_serve_flags_are_checked_before_loading(capsys, flags, message):
    from decodekit import cli

    assert cli.main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


def test_malloc_arenas_are_capped_unless_the_user_chose(monkeypatch):
    from decodekit.serve.limits import cap_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cap_malloc_arenas() is False  # the user's choice stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert cap_malloc_arenas() is True  # glibc (this project's Linux machines) takes the cap
