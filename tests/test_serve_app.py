"""``decodekit serve`` end to end: the real engine and the bundled model (float32) behind the
real HTTP server on a free loopback port, driven by the official ``openai`` client.

Greedy through the server equals offline ``decodekit.generate`` on the CLI's token ids, alone,
streamed, and with 16 concurrent clients of mixed strategies sharing the batch."""

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import decodekit  # noqa: E402
from decodekit.io import encode_prompts  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(real_model):
    from decodekit.model_info import context_length
    from decodekit.serve.app import BackgroundServer, create_app
    from decodekit.serve.engine import Engine

    model, tokenizer = real_model
    engine = Engine(model, tokenizer, max_batch_size=8)
    engine.start()
    app = create_app(engine, tokenizer, MODEL, context=context_length(model), api_key="test-key")
    running = BackgroundServer(app).start()
    yield running
    running.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test-key", max_retries=0, timeout=900)


def offline(real_model, prompt: str, max_new_tokens: int = MAX_TOKENS, **kwargs) -> str:
    """What ``decodekit generate --prompt PROMPT`` prints: the chat template's ids, decoded."""
    model, tokenizer = real_model
    ids = encode_prompts(tokenizer, [prompt], use_chat_template=True)
    out = decodekit.generate(model, ids, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **kwargs)
    return out.texts(tokenizer)[0]


def chat(client, prompt, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=kwargs.pop("max_tokens", MAX_TOKENS), **kwargs)


def test_greedy_equals_offline_and_streaming_reassembles(client, real_model):
    prompt = "What is the capital of France?"
    expected = offline(real_model, prompt)
    reply = chat(client, prompt)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10
    stats = reply.model_extra["decoding_stats"]
    assert stats["strategy"] == "greedy" and stats["forwards"] >= 1
    pieces = [c.choices[0].delta.content or "" for c in chat(client, prompt, stream=True) if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1


def test_decoding_field_switches_the_strategy(client, real_model):
    prompt = "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat."
    greedy = chat(client, prompt, max_tokens=16)
    lookup = chat(client, prompt, max_tokens=16, extra_body={"decoding": {"strategy": "prompt_lookup", "gamma": 5}})
    g, p = greedy.model_extra["decoding_stats"], lookup.model_extra["decoding_stats"]
    assert g["strategy"] == "greedy" and p["strategy"] == "prompt_lookup"
    assert p["forwards"] < g["forwards"]  # drafts were accepted
    assert lookup.choices[0].message.content == greedy.choices[0].message.content  # lossless


def test_stream_chunks_carry_token_kinds_and_stats(client):
    chunks = list(chat(client, "Count: 1, 2, 3, 4, 5, 6", stream=True, max_tokens=8,
                       extra_body={"decoding": {"strategy": "prompt_lookup"}}))
    tokens = [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("decodekit") or {}).get("tokens", [])]
    assert tokens and all(t["kind"] in ("plain", "accepted", "corrected", "bonus") for t in tokens)
    last = [ch for c in chunks for ch in c.choices if ch.finish_reason]
    assert len(last) == 1 and last[0].model_extra["decoding_stats"]["strategy"] == "prompt_lookup"


def test_bad_fields_are_400_and_the_key_is_checked(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, "hi", extra_body={"decoding": {"strategy": "prompt_lookup", "gamma": 0}})
    assert bad.value.body["param"] == "decoding.gamma"
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, "hi", max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(wrong, "hi")


def test_metrics_parse(client, server):
    from test_serve_protocol import _parse_prometheus

    chat(client, "hi", max_tokens=2)
    request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": "Bearer test-key"})
    samples = _parse_prometheus(urllib.request.urlopen(request).read().decode())
    assert samples["decodekit_requests_total"] >= 1
    assert samples['decodekit_http_responses_total{endpoint="/v1/chat/completions",code="200"}'] >= 1


def test_disconnect_mid_stream_cancels_and_others_go_on(client, server, real_model):
    """A client that stops reading a stream frees its row; a request alongside completes."""
    stream = chat(client, "Write a long story about a dragon.", stream=True, max_tokens=200)
    next(iter(stream))
    stream.close()
    assert chat(client, "What is 2+2?").choices[0].message.content == offline(real_model, "What is 2+2?")


LOAD_PROMPTS = ["What is the capital of France?", "List three prime numbers.", "Why is the sky blue?",
                "Name a colour.", "Say hello in French.", "What is 12 times 7?"]
LOAD_DECODING = [None, {"strategy": "prompt_lookup"}, {"strategy": "sample", "temperature": 0.7},
                 {"strategy": "ngram"}]


def test_concurrent_clients_mixed_strategies(client, real_model):
    """4 clients x 2 requests at once, mixed strategies (benchmarks/serve_load.py runs the full
    16 x 4 and reports throughput; kept small for a 2-core CI): every request completes; greedy
    ones (and the lossless speculative ones) equal their offline output whatever shares the batch."""
    jobs = [(c, r) for c in range(4) for r in range(2)]

    def one(job):
        c, r = job
        prompt, decoding = LOAD_PROMPTS[(c + r) % len(LOAD_PROMPTS)], LOAD_DECODING[c % len(LOAD_DECODING)]
        extra = {"decoding": decoding} if decoding else {}
        reply = chat(client, prompt, max_tokens=6, extra_body=extra)
        return prompt, decoding, reply.choices[0].message.content, reply.model_extra["decoding_stats"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    assert len(results) == len(jobs)
    cache = {}
    for prompt, decoding, text, stats in results:
        strategy = (decoding or {}).get("strategy", "greedy")
        assert stats["strategy"] == strategy
        if strategy in ("greedy", "prompt_lookup", "ngram"):
            if prompt not in cache:
                cache[prompt] = offline(real_model, prompt, max_new_tokens=6)
            assert text == cache[prompt], (prompt, strategy)
        assert json.dumps(stats)


def test_readme_openai_example_runs(server, capsys):
    """The docs' ``openai`` client example (docs/server.md), as written, against this server
    with its API key (tests/test_docs.py runs it against a server without one)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(from openai import OpenAI.*?)```", readme, flags=re.S).group(1)
    block = block.replace("http://127.0.0.1:8000", server.url).replace('api_key="s3cret"', 'api_key="test-key"')
    exec(compile(block, "README.md openai example", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "Paris" in printed and "'strategy': 'prompt_lookup'" in printed
