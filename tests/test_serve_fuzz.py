"""``decodekit serve`` fuzzed from its own OpenAPI schema (schemathesis, in-process ASGI, a tiny
random Llama with the bundled tokenizer): valid and invalid bodies for every endpoint. Every
response has a documented status, matches its documented schema (errors: OpenAI's
``{"error": {"message", "type", "param", "code"}}``), no 5xx; the server stays up and leaves
nothing running. A bounded number of examples here; ``benchmarks/serve_fuzz.py`` runs longer.

(schemathesis' pytest plugin (``schema.parametrize``) fails under pytest 9; the operations are
driven through hypothesis directly, ``serve.fuzz.fuzz_operation``.)"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode  # noqa: E402

from decodekit.serve.fuzz import OPERATIONS, build_fuzz_app, fuzz_operation  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = int(os.environ.get("DECODEKIT_FUZZ_EXAMPLES", "25"))  # per endpoint and mode


@pytest.fixture(scope="module")
def fuzz_app(bundled_tokenizer):
    app, engine = build_fuzz_app(bundled_tokenizer)
    yield app
    engine.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


# a GET without parameters has no invalid input: valid requests only
CASES = [(path, method, mode) for path, method in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if method == "POST" or mode == GenerationMode.POSITIVE]


@pytest.mark.parametrize("path, method, mode", CASES, ids=[f"{m} {p} {g.value}" for p, m, g in CASES])
def test_every_response_is_documented_and_never_5xx(api_schema, path, method, mode):
    assert fuzz_operation(api_schema, path, method, mode, EXAMPLES, seed=27) >= 1


def test_the_server_is_up_and_idle_after_fuzzing(fuzz_app):
    from fastapi.testclient import TestClient

    with TestClient(fuzz_app) as client:
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        end = time.monotonic() + 20  # a cancelled request (timed out, abandoned) leaves at the next step
        while (health := client.get("/health").json())["running_requests"] and time.monotonic() < end:
            time.sleep(0.05)
    assert health["running_requests"] == 0 and health["queue_length"] == 0 and health["running_rows"] == 0
