"""Extended Inference Sampler: scores checked against an independent, cache-free recomputation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

import decodekit
from decodekit import DecodeKitError, ExtendedInferenceSampler, format_eis_trace
from decodekit.processors import top_p_filtering

from conftest import CHAT_PROMPTS, EOS, chat_batch

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the reference
def _next_logp(model, seqs: list[list[int]], temperature=1.0, top_p=1.0) -> torch.Tensor:
    """Plain full forward of unpadded equal-length sequences, no cache -> log-probs [N, V]."""
    logits = model(input_ids=torch.tensor(seqs), use_cache=False, logits_to_keep=1).logits[:, -1].float()
    return torch.log_softmax(top_p_filtering(logits / temperature, top_p), dim=-1)


@torch.inference_mode()
def reference_scores(model, context, top_k, steps, gamma, eos, temperature=1.0, top_p=1.0):
    """S(c) for each top-k candidate, every rollout token from a fresh full forward of
    the whole unpadded sequence (the k candidates' sequences share one forward: same length)."""
    logp = _next_logp(model, [context], temperature, top_p)[0]
    cand_logp, cand = logp.topk(top_k)
    seqs = [context + [c] for c in cand.tolist()]
    scores = cand_logp.tolist()
    alive = [c not in eos for c in cand.tolist()]
    for t in range(1, steps + 1):
        step_logp = _next_logp(model, seqs, temperature, top_p)  # [k, V]
        for i, row in enumerate(step_logp):
            tok = int(row.argmax())
            if alive[i]:
                scores[i] += gamma**t * float(row[tok])
            alive[i] = alive[i] and tok not in eos
            seqs[i] = seqs[i] + [tok]
    return cand.tolist(), scores


def check_trace_against_reference(model, prompts, out, eos, **opts):
    steps, gamma, top_k = opts["lookahead_steps"], opts["discount_factor"], opts["top_k"]
    temperature, top_p = opts.get("temperature", 1.0), opts.get("top_p", 1.0)
    assert out.debug, "debug trace missing"
    for rec in out.debug:
        row, step = rec["row"], rec["step"]
        context = list(prompts[row]) + out.sequences[row][:step]
        cand, scores = reference_scores(model, context, top_k, steps, gamma, eos, temperature, top_p)
        assert rec["candidates"] == cand
        assert torch.allclose(torch.tensor(rec["scores"]), torch.tensor(scores), atol=1e-4, rtol=0), (rec, scores)
        assert rec["chosen"] == out.sequences[row][step]
        assert rec["chosen"] == cand[max(range(top_k), key=lambda i: scores[i])]
        finite = [s for s in scores if math.isfinite(s)]
        assert rec["mean_score"] == pytest.approx(sum(finite) / len(finite), abs=1e-4)


# ---------------------------------------------------------------- scores
@pytest.mark.parametrize("opts", [
    dict(lookahead_steps=3, discount_factor=0.9, top_k=5),
    dict(lookahead_steps=2, discount_factor=0.5, top_k=4, temperature=0.7, top_p=0.9),
])
def test_scores_match_cache_free_recomputation_tiny(tiny_model, opts):
    out = decodekit.generate(tiny_model, PROMPTS, strategy="eis", max_new_tokens=6, debug=True, **opts)
    check_trace_against_reference(tiny_model, PROMPTS, out, {EOS}, **opts)


@pytest.mark.slow
def test_scores_match_cache_free_recomputation_real(real_model):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:2])
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(2)]
    opts = dict(lookahead_steps=3, discount_factor=0.9, top_k=5)
    out = decodekit.generate(model, ids, mask, strategy="eis", max_new_tokens=3, debug=True, **opts)
    check_trace_against_reference(model, prompts, out, {2}, **opts)


def test_no_cache_path_gives_same_tokens_and_scores(llama):
    opts = dict(strategy="eis", max_new_tokens=5, debug=True, lookahead_steps=2, top_k=3)
    cached = decodekit.generate(llama, PROMPTS, **opts)
    plain = decodekit.generate(llama, PROMPTS, use_cache=False, **opts)
    assert cached.sequences == plain.sequences
    for a, b in zip(cached.debug, plain.debug, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


# ---------------------------------------------------------------- reductions and batching
@pytest.mark.parametrize("steps,top_k", [(0, 1), (0, 5), (2, 1)])
def test_reduces_to_greedy(tiny_model, steps, top_k):
    greedy = decodekit.generate(tiny_model, PROMPTS, strategy="greedy", max_new_tokens=12)
    eis = decodekit.generate(tiny_model, PROMPTS, strategy="eis", max_new_tokens=12,
                             lookahead_steps=steps, top_k=top_k)
    assert eis.sequences == greedy.sequences


@pytest.mark.slow
def test_reduces_to_greedy_real(real_model):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:3])
    greedy = decodekit.generate(model, ids, mask, strategy="greedy", max_new_tokens=16)
    eis = decodekit.generate(model, ids, mask, strategy="eis", max_new_tokens=16, lookahead_steps=0, top_k=1)
    assert eis.sequences == greedy.sequences


def test_lookahead_changes_choices(llama):
    """Guard against a scorer that silently ignores the rollouts."""
    greedy = decodekit.generate(llama, PROMPTS, strategy="greedy", max_new_tokens=12)
    eis = decodekit.generate(llama, PROMPTS, strategy="eis", max_new_tokens=12, lookahead_steps=3, top_k=5)
    assert eis.sequences != greedy.sequences


def test_batched_left_padding_equals_per_row(tiny_model):
    opts = dict(strategy="eis", max_new_tokens=8, lookahead_steps=3, top_k=5)
    batched = decodekit.generate(tiny_model, PROMPTS, **opts)
    for row, prompt in enumerate(PROMPTS):
        single = decodekit.generate(tiny_model, [prompt], **opts)
        assert single.sequences[0] == batched.sequences[row]


def test_finished_rows_leave_and_others_continue(llama):
    opts = dict(strategy="eis", max_new_tokens=8, lookahead_steps=2, top_k=3)
    free = decodekit.generate(llama, PROMPTS, **opts)
    stop = free.sequences[0][2]  # row 0's third token becomes EOS
    out = decodekit.generate(llama, PROMPTS, eos_token_id=stop, **opts)
    for row, prompt in enumerate(PROMPTS):
        single = decodekit.generate(llama, [prompt], eos_token_id=stop, **opts)
        assert out.sequences[row] == single.sequences[0]
    assert out.sequences[0] == free.sequences[0][:3]
    assert out.stats[0].finish_reason == "eos"
    assert any(len(s) == 8 for s in out.sequences[1:])  # someone went on after row 0 ended


def test_forward_count_is_lookahead_per_token(llama):
    for steps, per_token in [(3, 3), (1, 1), (0, 1)]:
        out = decodekit.generate(llama, PROMPTS[:1], strategy="eis", max_new_tokens=6, eos_token_id=[],
                                 lookahead_steps=steps, top_k=4)
        # prefill + per_token forwards per token (lookahead 0 does not feed the last token)
        expected = 1 + per_token * 6 - (1 if steps == 0 else 0)
        assert out.stats[0].forward_passes == expected


def test_sample_rollouts_are_seeded(llama):
    opts = dict(strategy="eis", max_new_tokens=8, lookahead_steps=2, top_k=4, rollout_mode="sample",
                temperature=1.0, debug=True)
    a = decodekit.generate(llama, PROMPTS, seed=1, **opts)
    b = decodekit.generate(llama, PROMPTS, seed=1, **opts)
    assert a.sequences == b.sequences
    runs = {str(decodekit.generate(llama, PROMPTS, seed=s, **opts).sequences) for s in range(2, 6)}
    assert len(runs) > 1
    for rec in a.debug:  # immediate log-probs are still the exact ones
        cand, _ = reference_scores(llama, list(PROMPTS[rec["row"]]) + a.sequences[rec["row"]][: rec["step"]],
                                   4, 0, 0.9, {EOS})
        assert rec["candidates"] == cand


# ---------------------------------------------------------------- the seed's class
def test_sampler_class_matches_generate(llama):
    sampler = ExtendedInferenceSampler(llama, None, lookahead_steps=2, discount_factor=0.8, top_k=3, debug=True)
    ids = torch.tensor([PROMPTS[0]])
    out = sampler.generate(ids, GenerationConfig(max_new_tokens=5, eos_token_id=EOS))
    ref = decodekit.generate(llama, ids, strategy="eis", max_new_tokens=5, lookahead_steps=2,
                             discount_factor=0.8, top_k=3)
    assert out.shape[0] == 1 and out[0, : ids.shape[1]].tolist() == PROMPTS[0]
    gen = out[0, ids.shape[1]:].tolist()
    assert gen[: len(ref.sequences[0])] == ref.sequences[0]
    assert sampler.last_output.debug


def test_rollout_batch_is_discounted_rollout_sum(llama):
    sampler = ExtendedInferenceSampler(llama, None, lookahead_steps=3, discount_factor=0.9, top_k=2)
    candidate_ids = torch.tensor([PROMPTS[2] + [40], PROMPTS[2] + [41]])
    got = sampler._rollout_batch(candidate_ids, {})
    for i, seq in enumerate(candidate_ids.tolist()):
        # S(c) - log p(c|x) of the reference, with c forced to the given candidate
        score, alive = 0.0, True
        with torch.inference_mode():
            for t in range(1, 4):
                lp = _next_logp(llama, [seq])[0]
                tok = int(lp.argmax())
                score += 0.9**t * float(lp[tok]) if alive else 0.0
                alive = alive and tok != EOS
                seq = seq + [tok]
        assert float(got[i]) == pytest.approx(score, abs=1e-4)


def test_format_trace(llama):
    out = decodekit.generate(llama, PROMPTS[:1], strategy="eis", max_new_tokens=2, top_k=3, debug=True)
    text = format_eis_trace(out.debug)
    assert text.count("step ") == 2 and text.count("*") == 2
    assert str(out.sequences[0][0]) in text and "mean S" in text


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("opts,name", [
    (dict(lookahead_steps=-1), "lookahead_steps"),
    (dict(discount_factor=0.0), "discount_factor"),
    (dict(discount_factor=1.5), "discount_factor"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=98), "top_k"),  # vocab is 97
    (dict(rollout_mode="beam"), "rollout_mode"),
    (dict(rollout_mode="sample", temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_input(llama, opts, name):
    with pytest.raises(DecodeKitError, match=name):
        decodekit.generate(llama, PROMPTS, strategy="eis", max_new_tokens=2, **opts)
    with pytest.raises(DecodeKitError, match=name):
        ExtendedInferenceSampler(llama, None, **opts)


def test_logits_processor_is_refused(llama):
    with pytest.raises(DecodeKitError, match="logits_processor"):
        decodekit.generate(llama, PROMPTS, strategy="eis", max_new_tokens=2,
                           logits_processor=decodekit.MultinomialProcessor(1.0))
