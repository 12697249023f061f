"""Faults stay local in the serving engine: a request whose processor, drafter or stop-string
tracker raises mid-decoding ends with an ``ErrorEvent``; the requests sharing its batch go on
and equal offline ``generate``; ``Engine.stop`` names its reason."""

from __future__ import annotations

import pytest

import decodekit
from decodekit.serve import Engine, EngineRequest
from decodekit.strategies.ngram import PromptLookupDrafter
from test_serve_engine import REPEATING, Collect

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

FIXED = dict(draft_policy="fixed", gamma=3, ignore_eos=True)


class Boom:
    """A logits processor that raises from its ``after + 1``-th call on."""

    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom: the processor failed")
        return scores


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, layers=2)


def run_together(model, requests, monkeypatch):
    """Submit every ``(prompt, params)`` before the engine starts (they are admitted, prefilled
    and decoded in ONE mixed lane: checked), then wait for all."""
    engine = Engine(model, None, max_batch_size=8)
    keys, join = set(), Engine._join

    def spy(self, jobs):
        keys.update(job.key for job in jobs)
        return join(self, jobs)

    monkeypatch.setattr(Engine, "_join", spy)
    cols = [Collect(n=p.get("num_return_sequences", 1)) for _, p in requests]
    for (prompt, params), col in zip(requests, cols):
        engine.submit(EngineRequest(prompt, params), col)
    engine.start()
    try:
        for col in cols:
            col.wait()
        metrics = engine.metrics()
    finally:
        engine.stop()
    assert metrics["batch_size"] == 0 and metrics["requests_running"] == 0  # nothing left behind
    assert len(keys) == 1  # one lane: the failing request shared the batch
    return cols


def healthy_requests():
    """Drafting rows first: greedy rows then join their lane (greedy drafts nothing)."""
    return [(REPEATING[1], dict(strategy="prompt_lookup", max_new_tokens=20, **FIXED)),
            (REPEATING[2], dict(strategy="ngram", max_new_tokens=16, **FIXED)),
            (REPEATING[0], dict(strategy="greedy", max_new_tokens=24, ignore_eos=True))]


def assert_healthy_equal_offline(model, requests, cols):
    for (prompt, params), col in zip(requests, cols):
        assert col.error is None, col.error
        assert col.tokens[0] == decodekit.generate(model, [prompt], **params).sequences[0], params


def test_a_raising_processor_fails_its_request_only(model, monkeypatch):
    healthy = healthy_requests()
    bad = (REPEATING[1], dict(strategy="greedy", max_new_tokens=24, ignore_eos=True, logits_processor=Boom(4)))
    cols = run_together(model, [healthy[0], bad, *healthy[1:]], monkeypatch)
    failed = cols.pop(1)
    assert "boom" in failed.error and not failed.done
    assert 1 <= len(failed.tokens[0]) < 24  # it failed mid-decoding, after some tokens
    assert_healthy_equal_offline(model, healthy, cols)


def test_a_raising_drafter_fails_its_request_only(model, monkeypatch):
    """prompt lookup with ngram_n=4 has a sub-drafter of its own in the mixed lane; it raises
    after a few steps; the prompt lookup rows of the default drafter go on."""
    calls = {"n": 0}
    candidates = PromptLookupDrafter.candidates

    def flaky(self, i, history, k):
        if self.max_ngram == 4:
            calls["n"] += 1
            if calls["n"] > 3:
                raise ValueError("drafter failed")
        return candidates(self, i, history, k)

    monkeypatch.setattr(PromptLookupDrafter, "candidates", flaky)
    healthy = healthy_requests()
    bad = (REPEATING[0], dict(strategy="prompt_lookup", ngram_n=4, max_new_tokens=30, **FIXED))
    cols = run_together(model, [bad, *healthy], monkeypatch)
    failed = cols.pop(0)
    assert "drafter failed" in failed.error and not failed.done
    assert_healthy_equal_offline(model, healthy, cols)


def test_a_raising_tracker_fails_its_request_only(model, monkeypatch):
    """A request's own row tracker (stop strings, detokenizing) raising ends that request."""
    from decodekit.outputs import RowTracker

    push = RowTracker.push

    def flaky(self, *args, **kwargs):
        if self.max_new_tokens == 17 and sum(map(len, self.tokens)) >= 3:
            raise RuntimeError("tracker failed")
        return push(self, *args, **kwargs)

    monkeypatch.setattr(RowTracker, "push", flaky)
    healthy = healthy_requests()
    bad = (REPEATING[2], dict(strategy="greedy", max_new_tokens=17, ignore_eos=True))
    cols = run_together(model, [*healthy, bad], monkeypatch)
    failed = cols.pop()
    assert "tracker failed" in failed.error and not failed.done
    assert_healthy_equal_offline(model, healthy, cols)


def test_stop_names_its_reason(model):
    engine = Engine(model, None)  # never started: the request waits in the queue
    col = Collect()
    engine.submit(EngineRequest([5, 6, 7], dict(max_new_tokens=4)), col)
    engine.stop("the server is shutting down", "server_shutting_down")
    assert col.wait(5).error == "the server is shutting down"


def test_a_lane_that_never_empties_keeps_a_bounded_cache(model, monkeypatch):
    """Rolling requests (each joins while the one before still runs) keep one lane alive for
    hundreds of steps; the left padding every row shares is dropped (``ModelState.compact``),
    so the cache stays about as wide as its longest row, and every row equals offline generate."""
    from decodekit.cache import ModelState

    compactions, compact = [0], ModelState.compact

    def counted(self):
        compactions[0] += 1
        return compact(self)

    monkeypatch.setattr(ModelState, "compact", counted)
    engine = Engine(model, None, max_batch_size=4)
    engine.start()
    params = dict(strategy="greedy", max_new_tokens=12, ignore_eos=True)
    prompts = [REPEATING[i % 3][: 4 + i % 5] for i in range(30)]
    cols, widest = [], 0
    try:
        for prompt in prompts:
            cols.append(Collect())
            engine.submit(EngineRequest(prompt, params), cols[-1])
            cols[-1].wait_tokens(4)
            widest = max(widest, engine.metrics()["cache_columns"])
        for col in cols:
            assert col.wait().error is None
    finally:
        engine.stop()
    assert widest < 80, widest  # 30 x 12 steps would be > 300 columns untrimmed
    assert compactions[0] >= 1
    for prompt, col in zip(prompts, cols):
        assert col.tokens[0] == decodekit.generate(model, [prompt], **params).sequences[0]
