"""NASD and prompt lookup: lossless greedy, distribution under sampling, drafters, bad input."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

import decodekit
from decodekit import DecodeKitError, NGramStorage, OneLevelNGramStorage
from decodekit.seed import TopKProcessor, ngram_assisted_speculative_generate
from decodekit.strategies.ngram import AcceptanceGate, prompt_lookup_candidates

from conftest import CHAT_PROMPTS, EOS, chat_batch


def _index(history: list[int], n: int) -> list[dict]:
    index = [{} for _ in range(n)]
    for end in range(len(history) - 1):
        for m in range(1, min(n, end + 1) + 1):
            index[m - 1][tuple(history[end - m + 1 : end + 1])] = end
    return index


def grounded_prompts() -> list[dict]:
    text = resources.files("decodekit").joinpath("data/grounded.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------- prompt lookup
def test_prompt_lookup_prefers_longest_then_most_recent_match():
    h = [1, 2, 3, 9, 7, 3, 8, 4, 2, 3, 6, 5, 1, 2, 3]
    # suffix "1 2 3" occurs at 0..2 -> drafts 9 7 ; "2 3" more recent at 8..9 is shorter
    assert prompt_lookup_candidates(_index(h, 3), h, 2) == (3, [9, 7])
    # with max match size 2: "2 3" -> the most recent occurrence (ends at 9) -> 6 5
    assert prompt_lookup_candidates(_index(h, 2), h, 2) == (2, [6, 5])
    # size 1: "3" last seen at 9 -> 6 5 1
    assert prompt_lookup_candidates(_index(h, 1), h, 3) == (1, [6, 5, 1])
    assert prompt_lookup_candidates(_index([4, 5, 6], 3), [4, 5, 6], 3) == (0, [])


def test_prompt_lookup_continues_repetitions_periodically():
    h = [5, 1, 2, 1, 2]  # "1 2" ended at 2, right before the suffix: period 2
    assert prompt_lookup_candidates(_index(h, 2), h, 5) == (2, [1, 2, 1, 2, 1])


def test_grounded_suite_is_shipped():
    suite = grounded_prompts()
    assert len(suite) >= 12
    assert {"summarise", "code_edit", "document_qa", "translate_repeat"} <= {p["task"] for p in suite}
    assert all(isinstance(p["prompt"], str) and len(p["prompt"]) > 40 for p in suite)


# ---------------------------------------------------------------------------- adaptive gate
def test_gate_closes_after_rejections_and_reopens_on_shadow_hits():
    gate = AcceptanceGate(gamma=4)
    gate.cost = [1.0, 1.1, 1.15, 1.2, 1.25]  # seconds of a step with k drafts
    gate.rows, gate.shadow = [{}], [None]
    assert gate.budget(0, 2, 4) > 0  # prior a = 1/2: drafting pays
    assert gate.budget(0, 2, 0) == 0  # nothing to draft
    for _ in range(6):
        gate.observe_row(0, 2, drafted=4, accepted=0)
    assert gate.budget(0, 2, 4) == 0  # drafts keep failing: plain steps
    assert gate.budget(0, 3, 4) > 0  # other evidence levels keep their own estimate
    for step in range(12):  # withheld drafts that would have been right
        gate.withhold(0, 2, token=7, position=step)
        gate.check_shadow(0, [7] * (step + 1))
    assert gate.budget(0, 2, 4) == 4


# ---------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("strategy,options", [
    ("ngram", {}),
    ("ngram", {"ngram_n": 2, "filler_top_k": 1, "gamma": 3, "draft_policy": "fixed"}),
    ("ngram", {"stop_if_unknown": True, "first_target": False}),
    ("ngram", {"draft_policy": "adaptive"}),
    ("prompt_lookup", {"draft_policy": "fixed"}),
    ("prompt_lookup", {"ngram_n": 2, "gamma": 7, "draft_policy": "fixed"}),
    ("prompt_lookup", {}),
])
def test_greedy_identical_to_greedy_decoding_tiny(tiny_model, strategy, options):
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(4, 97, (4, 6), generator=gen)
    ids = torch.cat([base, base, base[:, :3]], dim=1)  # repeated text: drafts get accepted
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    ref = decodekit.generate(tiny_model, ids, mask, strategy="greedy", max_new_tokens=24)
    out = decodekit.generate(tiny_model, ids, mask, strategy=strategy, max_new_tokens=24, **options)
    assert out.sequences == ref.sequences
    assert sum(s.accepted for s in out.stats) > 0 or options.get("draft_policy") != "fixed"


def test_drafts_save_forwards_and_stats_are_filled(llama):
    base = torch.arange(10, 30)[None]
    ids = torch.cat([base, base, base[:, :4]], dim=1)
    ref = decodekit.generate(llama, ids, strategy="greedy", max_new_tokens=30, eos_token_id=EOS)
    out = decodekit.generate(llama, ids, strategy="prompt_lookup", max_new_tokens=30, eos_token_id=EOS,
                             draft_policy="fixed")
    assert out.sequences == ref.sequences
    stats = out.stats[0]
    assert stats.drafted > 0 and 0 < stats.acceptance_rate <= 1
    assert stats.forward_passes < ref.stats[0].forward_passes
    assert sum(stats.acceptance_histogram.values()) == len(stats.accept_lengths)


def test_seed_api_matches_autoregressive_and_fills_the_storage(gemma):
    prompt = list(range(20, 36)) * 2
    storage = NGramStorage(3, 97)
    tokens, rate = ngram_assisted_speculative_generate(
        prompt, storage, gemma, gamma=4, max_gen_len=20, eos_tokens_id=EOS, use_cache=True)
    ref = decodekit.autoregressive_generate(prompt, gemma, max_gen_len=20, eos_tokens_id=EOS)
    assert tokens == ref
    assert 0.0 <= rate <= 1.0
    assert storage.has_gram(prompt[:3]) and storage.has_gram(prompt[-2:] + ref[:1])
    # no cache (the seed's default) gives the same tokens
    tokens2, _ = ngram_assisted_speculative_generate(
        prompt, OneLevelNGramStorage(3, 97), gemma, max_gen_len=20, eos_tokens_id=EOS)
    assert tokens2 == ref


def _exact_first_two(model, ids, proc):
    """Exact distribution of the first two tokens: p1 [V], p2 [V] (marginal)."""
    with torch.no_grad():
        p1 = proc(model(ids).logits[:, -1])[0]  # [V]
        support = torch.nonzero(p1).squeeze(-1)
        batch = torch.cat([ids.expand(len(support), -1), support[:, None]], dim=1)
        p2_given = proc(model(batch).logits[:, -1])  # [S, V]
    return p1, (p1[support, None] * p2_given).sum(0)


@pytest.mark.parametrize("strategy", ["ngram", "prompt_lookup"])
def test_sampling_follows_the_target_distribution(llama, strategy):
    proc = TopKProcessor(temperature=0.05, top_k=4)
    seed = torch.arange(40, 46)[None]
    cont = decodekit.generate(llama, seed, strategy="greedy", max_new_tokens=8).sequences[0]
    ids = torch.cat([seed, torch.tensor([cont]), seed], dim=1)  # drafts = the greedy continuation
    p1, p2 = _exact_first_two(llama, ids, proc)
    n = 3000
    opts = {"first_target": False} if strategy == "ngram" else {}
    out = decodekit.generate(llama, ids.expand(n, -1), strategy=strategy, max_new_tokens=2, seed=0,
                             logits_processor=TopKProcessor(temperature=0.05, top_k=4),
                             draft_policy="fixed", **opts)
    seqs = torch.tensor([s[:2] for s in out.sequences])
    stats = out.stats
    accepted = sum(s.accepted for s in stats)
    # both paths exercised (prompt lookup: 1 draft per row, capped by the 1 token left after the first)
    assert accepted > n // 10 and accepted < sum(s.drafted for s in stats)
    for pos, exact in ((0, p1), (1, p2)):
        freq = torch.bincount(seqs[:, pos], minlength=exact.numel()).double() / n
        tv = 0.5 * (freq - exact.double()).abs().sum().item()
        assert tv < 0.045, (pos, tv)  # sampling noise: E[TV] ~ 0.01-0.02 here


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("strategy,options,match", [
    ("ngram", {"ngram_n": 1}, "ngram_n must be >= 2"),
    ("prompt_lookup", {"ngram_n": 0}, "ngram_n must be >= 2"),
    ("ngram", {"gamma": 0}, "gamma must be >= 1"),
    ("prompt_lookup", {"gamma": 0}, "gamma must be >= 1"),
    ("ngram", {"filler_top_k": 0}, "filler_top_k must be >= 1"),
    ("ngram", {"storage": NGramStorage(3, 1000)}, "vocab_size .1000. does not match"),
    ("ngram", {"draft_policy": "egag"}, "draft_policy must be one of"),
    ("prompt_lookup", {"filler_top_k": 2}, "unknown option"),
])
def test_bad_input(llama, strategy, options, match):
    with pytest.raises(DecodeKitError, match=match):
        decodekit.generate(llama, [[5, 6, 7]], strategy=strategy, max_new_tokens=4, **options)


def test_seed_api_rejects_a_storage_of_another_vocabulary(llama):
    with pytest.raises(DecodeKitError, match="vocab_size"):
        ngram_assisted_speculative_generate([5, 6, 7], NGramStorage(3, 50), llama)


# ---------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def real_prompts():
    """20 prompts: the 12 chat prompts and the first 8 grounded ones (all four tasks twice)."""
    return CHAT_PROMPTS + [p["prompt"] for p in grounded_prompts()[:8]]


@pytest.mark.slow
def test_real_model_greedy_identical_batch4(real_model, real_prompts):
    """Both strategies on 8 prompts (4 chat + the four grounded tasks), 4 rows per batch.

    The tiny-model tests cover the batch mechanics; these rows check the real model's drafts.
    """
    model, tokenizer = real_model
    prompts = real_prompts[:4] + real_prompts[12:16]
    drafted = {"ngram": 0, "prompt_lookup": 0}
    for start in range(0, len(prompts), 4):
        batch = prompts[start : start + 4]
        ids, mask = chat_batch(tokenizer, batch)
        ref = decodekit.generate(model, ids, mask, strategy="greedy", max_new_tokens=32)
        for strategy in drafted:
            out = decodekit.generate(model, ids, mask, strategy=strategy, max_new_tokens=32,
                                     draft_policy="fixed")
            assert out.sequences == ref.sequences, (strategy, batch)
            drafted[strategy] += sum(s.drafted for s in out.stats)
    assert all(drafted.values())


@pytest.mark.slow
def test_real_model_greedy_identical_batch1(real_model, real_prompts):
    """Default options (prompt lookup: adaptive), one row at a time, chat and grounded."""
    model, tokenizer = real_model
    for i, prompt in enumerate(real_prompts[::5]):
        ids, mask = chat_batch(tokenizer, [prompt])
        ref = decodekit.generate(model, ids, mask, strategy="greedy", max_new_tokens=32)
        strategy = "ngram" if i % 2 else "prompt_lookup"
        out = decodekit.generate(model, ids, mask, strategy=strategy, max_new_tokens=32)
        assert out.sequences == ref.sequences, (strategy, prompt)
