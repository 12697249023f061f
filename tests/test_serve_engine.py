"""The serving engine: continuous batching equals offline generate, cancel, failures, queue."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
import torch

import decodekit
from decodekit.serve import DoneEvent, Engine, EngineRequest, ErrorEvent, QueueFull, TokenEvent
from decodekit.validation import DecodeKitError

from conftest import chat_batch, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

REPEATING = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10], [12, 13, 14, 15, 16, 17, 12, 13, 14]]


class Collect:
    """``on_event`` recording a request's events; ``wait()`` until every choice is done."""

    def __init__(self, n: int = 1):
        self.n = n
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.kinds: dict[int, list[str]] = defaultdict(list)
        self.logprobs: dict[int, list[float]] = defaultdict(list)
        self.top: dict[int, list] = defaultdict(list)
        self.done: dict[int, DoneEvent] = {}
        self.error: str | None = None
        self.finished = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, TokenEvent):
            assert event.index not in self.done
            self.tokens[event.index] += event.token_ids
            self.kinds[event.index] += event.kinds
            self.logprobs[event.index] += event.logprobs or []
            self.top[event.index] += event.top_logprobs or []
        elif isinstance(event, DoneEvent):
            self.done[event.index] = event
        else:
            assert isinstance(event, ErrorEvent)
            self.error = event.message
        if self.error is not None or len(self.done) == self.n:
            self.finished.set()

    def wait(self, timeout: float = 120) -> Collect:
        assert self.finished.wait(timeout), "request did not finish"
        return self

    def wait_tokens(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while len(self.tokens[0]) < n and not self.finished.is_set():
            assert time.monotonic() < end, "no tokens"
            time.sleep(0.002)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, layers=2)


@pytest.fixture
def engine(model):
    eng = Engine(model, None, max_batch_size=8)
    eng.start()
    yield eng
    eng.stop()


def offline(model, prompt, **params):
    out = decodekit.generate(model, [prompt], **params)
    return out.sequences[0], out


def staggered(engine, prompts, params_list):
    """Submit one request, wait for its first tokens, submit the next...: each joins the running batch."""
    seen_batch, results = 1, []
    for prompt, params in zip(prompts, params_list):
        col = Collect()
        engine.submit(EngineRequest(prompt, params), col)
        col.wait_tokens(2)
        seen_batch = max(seen_batch, engine.metrics()["batch_size"])
        results.append(col)
    for col in results:
        col.wait()
        assert col.error is None, col.error
    return results, seen_batch


@pytest.mark.parametrize("strategy, options", [
    ("greedy", {}),
    ("prompt_lookup", {"draft_policy": "fixed", "gamma": 3}),
    ("ngram", {"draft_policy": "fixed", "gamma": 2}),
    ("speculative", {"drafter": "layers:1", "draft_policy": "fixed", "gamma": 3}),
    # a history processor per row; fixed drafting: the default (cost) policy picks widths from
    # timings, so offline and served runs would verify different widths and a near-tie of this
    # tiny random model could flip (seen once in seven runs under load)
    ("prompt_lookup", {"repetition_penalty": 1.3, "draft_policy": "fixed", "gamma": 4}),
    ("speculative", {"drafter": "layers:1", "draft_policy": "egag", "gamma": 4, "egag_ema_beta": 0.5}),
])
def test_staggered_rows_equal_offline_generate(model, engine, strategy, options):
    """Rows join a running batch at different times, with different lengths and budgets; each
    equals decodekit.generate for its prompt alone (batch of 1)."""
    budgets = [40, 24, 12]
    params = [dict(strategy=strategy, max_new_tokens=m, ignore_eos=True, **options) for m in budgets]
    results, seen_batch = staggered(engine, REPEATING, params)
    assert seen_batch >= 2  # the rows really shared a batch
    for prompt, p, col in zip(REPEATING, params, results):
        want, out = offline(model, prompt, **p)
        assert col.tokens[0] == want
        assert len(col.kinds[0]) == len(want) and len(col.logprobs[0]) == len(want)
        stats = col.done[0].stats
        assert stats["batched"] is True and stats["strategy"] == strategy
        assert col.done[0].finish_reason == "length"
    kinds = {k for col in results for k in col.kinds[0]}
    assert kinds == {"plain"} if strategy == "greedy" else {"accepted", "plain"} <= kinds
    assert engine.metrics()["batch_size"] == 0


def test_gemma3_sliding_window_rows_join(tiny_model):
    """Llama and Gemma-3 (its 16-token sliding window is passed): staggered prompt lookup rows
    equal offline generate."""
    engine = Engine(tiny_model, None)
    engine.start()
    prompts = [list(range(20, 40)) * 2, [5, 6, 7], list(range(40, 58))]
    params = [dict(strategy="prompt_lookup", max_new_tokens=m, ignore_eos=True, draft_policy="fixed")
              for m in (30, 20, 10)]
    try:
        results, seen = staggered(engine, prompts, params)
    finally:
        engine.stop()
    assert seen >= 2
    for prompt, p, col in zip(prompts, params, results):
        assert col.tokens[0] == offline(tiny_model, prompt, **p)[0]


def test_mixed_lanes_logprobs_and_seeded_sampling(model, engine):
    """Greedy, seeded sampling and prompt lookup run at once in their lanes; seeded sampling is the
    same as offline (its own generator); logprobs equal generate's."""
    sample = dict(strategy="sample", temperature=0.8, seed=7, max_new_tokens=20, ignore_eos=True)
    greedy = dict(strategy="greedy", max_new_tokens=16, logprobs=2, ignore_eos=True)
    look = dict(strategy="prompt_lookup", max_new_tokens=16, ignore_eos=True)
    cols = [Collect() for _ in range(4)]
    engine.submit(EngineRequest(REPEATING[0], sample), cols[0])
    engine.submit(EngineRequest(REPEATING[1], greedy), cols[1])
    engine.submit(EngineRequest(REPEATING[2], look), cols[2])
    engine.submit(EngineRequest(REPEATING[2], dict(sample, seed=8)), cols[3])
    for col in cols:
        assert col.wait().error is None
    want, _ = offline(model, REPEATING[0], **sample)
    assert cols[0].tokens[0] == want
    want, out = offline(model, REPEATING[1], **greedy)
    assert cols[1].tokens[0] == want
    assert cols[1].logprobs[0] == pytest.approx([e["logprob"] for e in out.logprobs[0]], abs=1e-4)
    assert [[t["token_id"] for t in top] for top in cols[1].top[0]] == \
        [[t["token_id"] for t in e["top_logprobs"]] for e in out.logprobs[0]]
    assert cols[2].tokens[0] == offline(model, REPEATING[2], **look)[0]
    assert cols[3].tokens[0] == offline(model, REPEATING[2], **dict(sample, seed=8))[0]


def test_strategies_and_knobs_share_one_mixed_lane(model, engine):
    """Prompt lookup, NASD, greedy (with logprobs), unseeded sampling with top_p and a penalty
    row, joining at different times, decode in ONE batch; every lossless row equals offline
    generate for its prompt alone (greedy rows verified next to sampling rows stay greedy)."""
    fixed = dict(draft_policy="fixed", gamma=3, ignore_eos=True)
    params = [dict(strategy="prompt_lookup", max_new_tokens=40, **fixed),
              dict(strategy="ngram", max_new_tokens=36, **fixed),
              dict(strategy="greedy", max_new_tokens=30, logprobs=1, ignore_eos=True),
              dict(strategy="sample", temperature=0.9, top_p=0.9, max_new_tokens=24, ignore_eos=True),
              dict(strategy="prompt_lookup", repetition_penalty=1.3, max_new_tokens=20, **fixed),
              dict(strategy="greedy", max_new_tokens=12, ignore_eos=True)]
    prompts = [REPEATING[i % 3] for i in range(len(params))]
    cols, seen = [], []
    for prompt, p in zip(prompts, params):
        cols.append(Collect())
        engine.submit(EngineRequest(prompt, p), cols[-1])
        cols[-1].wait_tokens(2)
        seen.append((engine.metrics()["batch_size"], engine.metrics()["lanes"]))
    for col in cols:
        assert col.wait().error is None, col.error
    assert max(b for b, _ in seen) >= 4 and max(n for _, n in seen) == 1  # one lane, many rows
    for prompt, p, col in zip(prompts, params, cols):
        assert len(col.tokens[0]) == p["max_new_tokens"] and col.done[0].stats["batched"]
        if p["strategy"] != "sample":
            assert col.tokens[0] == offline(model, prompt, **p)[0], p
    assert {"accepted"} <= set(cols[0].kinds[0]) and set(cols[2].kinds[0]) == {"plain"}
    assert len(cols[2].logprobs[0]) == 30


def test_requests_admitted_together_are_prefilled_in_one_batch(model, monkeypatch):
    """Requests waiting when the engine looks are prefilled in ONE forward (left padded, the
    copies of a num_return_sequences prompt shared), each row with its own drafter and
    processor; lossless rows equal offline generate."""
    from decodekit.cache import ModelState

    batches, prefill = [], ModelState.prefill.__func__

    def spy(cls, model_, ids, *args, **kwargs):
        batches.append(ids.shape[0])
        return prefill(cls, model_, ids, *args, **kwargs)

    monkeypatch.setattr(ModelState, "prefill", classmethod(spy))
    fixed = dict(draft_policy="fixed", gamma=3, ignore_eos=True)
    params = [dict(strategy="prompt_lookup", max_new_tokens=20, **fixed),
              dict(strategy="ngram", max_new_tokens=16, **fixed),
              dict(strategy="greedy", max_new_tokens=12, ignore_eos=True),
              dict(strategy="sample", num_return_sequences=2, max_new_tokens=10, ignore_eos=True),
              dict(strategy="prompt_lookup", repetition_penalty=1.3, max_new_tokens=14, **fixed)]
    prompts = [REPEATING[i % 3] for i in range(len(params))]
    engine = Engine(model, None, max_batch_size=8)
    cols = [Collect(n=p.get("num_return_sequences", 1)) for p in params]
    for prompt, p, col in zip(prompts, params, cols):
        engine.submit(EngineRequest(prompt, p), col)  # the engine is not running yet: all wait
    engine.start()
    try:
        for col in cols:
            assert col.wait().error is None, col.error
    finally:
        engine.stop()
    assert 5 in batches  # five distinct prompts, one prefill (cost curves use powers of two)
    for prompt, p, col in zip(prompts, params, cols):
        assert all(len(col.tokens[i]) == p["max_new_tokens"] for i in range(col.n))
        if p["strategy"] != "sample":
            assert col.tokens[0] == offline(model, prompt, **p)[0], p


def test_n_samples_are_choices(engine):
    col = Collect(n=2)
    engine.submit(EngineRequest([5, 6, 7], dict(strategy="sample", num_return_sequences=2, max_new_tokens=6,
                                                ignore_eos=True)), col)
    col.wait()
    assert sorted(col.done) == [0, 1] and all(len(col.tokens[i]) == 6 for i in (0, 1))


def test_cancel_frees_the_row(model, engine):
    long = Collect()
    handle = engine.submit(EngineRequest([5, 6, 7], dict(max_new_tokens=200, ignore_eos=True)), long)
    long.wait_tokens(3)
    handle.cancel()
    other = Collect()
    engine.submit(EngineRequest([8, 9], dict(max_new_tokens=8, ignore_eos=True)), other)
    other.wait()
    assert other.tokens[0] == offline(model, [8, 9], max_new_tokens=8, ignore_eos=True)[0]
    time.sleep(0.05)
    assert not long.done and len(long.tokens[0]) < 200
    metrics = engine.metrics()
    assert metrics["batch_size"] == 0 and metrics["requests_running"] == 0


def test_a_failing_request_does_not_stop_the_others(model, engine):
    bad, good = Collect(), Collect()
    engine.submit(EngineRequest([5, 6, 7], dict(strategy="speculative", drafter="layers:9")), bad)
    engine.submit(EngineRequest([8, 9], dict(max_new_tokens=8, ignore_eos=True)), good)
    assert "layers" in bad.wait().error
    assert good.wait().error is None
    assert good.tokens[0] == offline(model, [8, 9], max_new_tokens=8, ignore_eos=True)[0]


def test_solo_strategy_reports_its_beams(model, engine):
    col = Collect(n=2)
    params = dict(strategy="beam", num_beams=2, num_return_sequences=2, max_new_tokens=6)
    engine.submit(EngineRequest([5, 6, 7], params), col)
    col.wait()
    out = decodekit.generate(model, [[5, 6, 7]], **params)
    assert [col.tokens[i] for i in (0, 1)] == out.sequences
    stats = col.done[0].stats
    assert stats["batched"] is False
    assert [b["token_ids"] for b in stats["beams"]] == out.sequences


def test_eis_reports_its_candidate_tables(model, engine):
    col = Collect()
    params = dict(strategy="eis", top_k=3, lookahead_steps=2, max_new_tokens=4)
    engine.submit(EngineRequest([5, 6, 7], params), col)
    col.wait()
    assert col.tokens[0] == offline(model, [5, 6, 7], **params)[0]
    steps = col.done[0].stats["eis_steps"]
    assert len(steps) == len(col.tokens[0]) and len(steps[0]["candidates"]) == 3
    assert col.done[0].stats["batched"] is False


def test_queue_full_and_check_errors_name_the_field(model):
    engine = Engine(model, None, max_batch_size=2, max_queue=2)  # not started: requests wait
    for _ in range(2):
        engine.submit(EngineRequest([5, 6], {}), Collect())
    with pytest.raises(QueueFull):
        engine.submit(EngineRequest([5, 6], {}), Collect())
    bad = [
        ({"strategy": "nope"}, "strategy"),
        ({"strategy": "prompt_lookup", "gamma": 0}, "gamma"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.5}, "temperature"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"tokenizer": "x"}, "tokenizer"),
    ]
    for params, name in bad:
        with pytest.raises(DecodeKitError, match=name):
            engine.check(EngineRequest([5, 6], params))
    with pytest.raises(DecodeKitError, match="context"):
        engine.check(EngineRequest(list(range(4, 90)) * 3, {}))
    assert engine.metrics()["requests_total"] == 2
    engine.stop()


@pytest.mark.slow
def test_real_model_staggered_greedy_equals_offline(real_model):
    model, tok = real_model
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.", "hi"]
    rows = []
    for p in prompts:
        ids, mask = chat_batch(tok, [p])
        rows.append(ids[0][mask[0].bool()].tolist())
    engine = Engine(model, tok, max_batch_size=4)
    engine.start()
    try:
        results, seen = staggered(engine, rows, [dict(max_new_tokens=24)] * 4)
    finally:
        engine.stop()
    assert seen >= 2
    for row, col in zip(rows, results):
        assert col.tokens[0] == decodekit.generate(model, [row], max_new_tokens=24).sequences[0]


def test_model_drafter_takes_rows_after_computing_first_logits(model):
    """A drafter whose first-draft logits were computed but not used takes rows: its last token
    is fed again with the newcomers' prompts; every row's logits equal a drafter of its own."""
    from decodekit.strategies.speculative import ModelDrafter

    def drafter_for(rows):
        ids, mask = decodekit.cache.left_pad(rows, 0)
        req = decodekit.api.build_request(model, ids, mask, max_new_tokens=4)[2]
        drafter = ModelDrafter(model)
        drafter.prefill(req)
        return drafter

    running = drafter_for(REPEATING[:2])
    running.first_logits(REPEATING[:2])  # computed (as EGAG does), never used for a draft
    running.add_rows(drafter_for(REPEATING[2:]))
    got = running.first_logits(REPEATING)
    for b, row in enumerate(REPEATING):
        alone = drafter_for([row]).first_logits([row])[0]
        assert torch.allclose(got[b], alone, atol=1e-4), b


def test_served_ngram_rows_build_their_drafter_as_generate_does(model, engine):
    """The engine builds drafters with the strategy's own ``make_drafter``: the n-gram storage's
    vocabulary check gives generate's error, and a one-row request uses (and updates) the
    caller's storage as generate does."""
    from decodekit.ngram_storage import NGramStorage

    vocab = model.config.vocab_size
    wrong = dict(strategy="ngram", storage=NGramStorage(3, vocab + 1), max_new_tokens=4)
    with pytest.raises(DecodeKitError) as offline_error:
        decodekit.generate(model, [[5, 6, 7]], **wrong)
    bad = Collect()
    engine.submit(EngineRequest([5, 6, 7], wrong), bad)
    assert bad.wait().error == str(offline_error.value)

    prompt, params = REPEATING[0], dict(strategy="ngram", max_new_tokens=6, ignore_eos=True, draft_policy="fixed")
    offline_storage, served_storage = NGramStorage(3, vocab), NGramStorage(3, vocab)
    want = offline(model, prompt, storage=offline_storage, **params)[0]
    col = Collect()
    engine.submit(EngineRequest(prompt, dict(params, storage=served_storage)), col)
    assert col.wait().error is None and col.tokens[0] == want
    assert len(served_storage) == len(offline_storage) > 0  # both counted the prompt and the output


def test_a_request_cancelled_as_its_last_token_arrives_is_counted_as_closed(model):
    """A client that goes away while its row's last step runs: the row finishes in that step,
    the request is closed, not left counted as running (found by the long fuzz run)."""
    seen: list[int] = []
    handles = []

    def on_event(event) -> None:
        if isinstance(event, TokenEvent):
            seen.extend(event.token_ids)
            if len(seen) >= 3:
                handles[0].cancel()  # inside the step: after the last token, before the row leaves

    engine = Engine(model, None)
    handles.append(engine.submit(EngineRequest([5, 6, 7], dict(max_new_tokens=3, ignore_eos=True)), on_event))
    engine.start()  # submitted first: the handle exists before any event
    try:
        end = time.monotonic() + 30
        while len(seen) < 3 or engine.metrics()["requests_running"] or engine.metrics()["queue_depth"]:
            assert time.monotonic() < end, (seen, engine.metrics())
            time.sleep(0.01)
    finally:
        engine.stop()
