"""Graceful shutdown: SIGTERM to a real ``decodekit serve`` process (a tiny random Llama via
``--model_path``, loopback) lets the running stream finish, refuses new requests, exits 0; a
drain past its grace period cancels what is left with a clear event."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")

from decodekit.serve.engine import Engine, EngineRequest  # noqa: E402
from decodekit.serve.shutdown import SHUTDOWN_CODE, Drain  # noqa: E402
from test_serve_engine import Collect  # noqa: E402

from conftest import tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the server exited while starting"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


def post_status(url: str, body: dict) -> int | str:
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return "refused"


def test_sigterm_drains_the_running_stream_and_exits_0(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "decodekit", "serve", "--model_path", str(tiny_model_dir),
                             "--port", str(port), "--max_batch_size", "2", "--shutdown_grace", "60"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(url, proc)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 120, "stream": True,
                "decoding": {"ignore_eos": True}}
        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        stream = urllib.request.urlopen(request, timeout=60)
        assert stream.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = stream.read().decode()  # the stream runs to its end
        assert post_status(url, {"messages": [{"role": "user", "content": "hi"}]}) in (503, "refused")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length" and "error" not in rest
    output = (tmp_path / "serve.log").read_text()
    assert "draining" in output and "drained (0 request(s) cancelled)" in output


def test_drain_past_its_grace_cancels_with_a_clear_reason(bundled_tokenizer):
    """The engine is not running: the queued request is still there when the grace ends."""
    from fastapi.testclient import TestClient

    from decodekit.serve.app import create_app

    engine = Engine(tiny_llama(seed=3, vocab=len(bundled_tokenizer)), bundled_tokenizer)
    col = Collect()
    engine.submit(EngineRequest([5, 6, 7], dict(max_new_tokens=4)), col)
    app = create_app(engine, bundled_tokenizer, "tiny", context=256, grace=0.2)
    drain: Drain = app.state.server.drain
    with TestClient(app) as client:
        drain.begin()
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == SHUTDOWN_CODE
        assert drain.finished.wait(10) and drain.cancelled == 1
    assert "shutting down" in col.wait(5).error and "grace" in col.error
