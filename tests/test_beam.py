"""Beam search: equal to transformers' beam search (sequences and scores), GNMT scores,
num_beams=1 == greedy, the seed API, debug trace, validation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import decodekit
from decodekit import DecodeKitError, beam_search_generate, format_beam_trace, generate
from decodekit.strategies.beam import LengthPenalty

from conftest import CHAT_PROMPTS, PAD, chat_batch, tiny_gemma3, tiny_llama

# (num_beams, length_penalty, early_stopping, num_return_sequences)
HF_CONFIGS = [
    (2, 1.0, False, 1),
    (4, 0.5, True, 2),
    (4, 2.0, "never", 1),
    (3, 0.0, False, 3),
    (4, 1.0, "never", 4),
    (2, -1.0, False, 2),  # a negative penalty favours short hypotheses
]


def tiny_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, 97, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    return decodekit.left_pad(rows, PAD)


def frequent_token(model, ids, mask) -> int:
    """A token greedy decoding produces often: used as EOS so hypotheses end early."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         eos_token_id=None, pad_token_id=PAD)
    return Counter(out[:, ids.shape[1]:].flatten().tolist()).most_common(1)[0][0]


def hf_beam(model, ids, mask, k, lp, es, nrs, max_new_tokens, eos, pad=PAD):
    """transformers beam search: new tokens per returned sequence (cut after EOS) and scores."""
    out = model.generate(
        ids, attention_mask=mask, num_beams=k, do_sample=False, length_penalty=lp, early_stopping=es,
        num_return_sequences=nrs, max_new_tokens=max_new_tokens, output_scores=True,
        return_dict_in_generate=True, eos_token_id=eos, pad_token_id=pad,
    )
    eos_set = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out.sequences[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        rows.append(row[:cut])
    return rows, out.sequences_scores.tolist()


def ours(model, ids, mask, k, lp, es, nrs, max_new_tokens, eos, **kw):
    return generate(model, ids, mask, strategy="beam", num_beams=k, length_penalty=lp, early_stopping=es,
                    num_return_sequences=nrs, max_new_tokens=max_new_tokens, eos_token_id=eos, **kw)


def sum_logprob(model, prompt: list[int], new: list[int]) -> float:
    """Teacher-forced sum of log p(new tokens | prompt) with one plain forward."""
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(new) - 1)
    return float(logp[pos, torch.tensor(new)].sum())


# ---------------------------------------------------------------------------- vs transformers
@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("config", HF_CONFIGS, ids=lambda c: f"k{c[0]}-lp{c[1]}-es{c[2]}-n{c[3]}")
def test_equals_transformers_tiny(make, config):
    model = make()
    ids, mask = tiny_batch()
    eos = frequent_token(model, ids, mask)
    k, lp, es, nrs = config
    hf_rows, hf_scores = hf_beam(model, ids, mask, k, lp, es, nrs, 12, eos)
    out = ours(model, ids, mask, k, lp, es, nrs, 12, eos, pad_token_id=PAD)
    assert out.sequences == hf_rows
    assert out.scores == pytest.approx(hf_scores, abs=1e-5)
    assert len(out.stats) == ids.shape[0]
    if es != "never":  # some hypotheses ended at EOS: the EOS path is tested
        assert any(len(r) < 12 for r in hf_rows)


def test_equals_transformers_two_eos_ids(llama):
    ids, mask = tiny_batch(1)
    first = frequent_token(llama, ids, mask)
    eos = [first, (first + 1) % 97]  # 3 * num_beams candidates per step
    hf_rows, hf_scores = hf_beam(llama, ids, mask, 3, 1.0, False, 2, 10, eos)
    out = ours(llama, ids, mask, 3, 1.0, False, 2, 10, eos, pad_token_id=PAD)
    assert out.sequences == hf_rows
    assert out.scores == pytest.approx(hf_scores, abs=1e-5)


# (config, prompts): both beam widths on all 12 prompts, more penalties on a 4-prompt batch
REAL_CASES = [(HF_CONFIGS[0], 12), (HF_CONFIGS[1], 12), (HF_CONFIGS[2], 4), (HF_CONFIGS[3], 4)]


@pytest.mark.slow
@pytest.mark.parametrize("config,n", REAL_CASES, ids=lambda c: f"k{c[0]}-lp{c[1]}-es{c[2]}-n{c[3]}"
                         if isinstance(c, tuple) else f"{c}prompts")
def test_equals_transformers_real_model(real_model, config, n):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:n])  # left padded
    k, lp, es, nrs = config
    hf_rows, hf_scores = hf_beam(model, ids, mask, k, lp, es, nrs, 10, 2, pad=2)
    out = ours(model, ids, mask, k, lp, es, nrs, 10, 2)
    assert out.sequences == hf_rows
    assert max(abs(a - b) for a, b in zip(out.scores, hf_scores)) < 1e-4
    assert len(out.sequences) == n * nrs and len(out.stats) == n


# ---------------------------------------------------------------------------- greedy, cache
def test_one_beam_is_greedy(tiny_model):
    ids, mask = tiny_batch(2)
    eos = frequent_token(tiny_model, ids, mask)
    greedy = generate(tiny_model, ids, mask, strategy="greedy", max_new_tokens=12, eos_token_id=eos)
    beam = generate(tiny_model, ids, mask, strategy="beam", num_beams=1, max_new_tokens=12, eos_token_id=eos)
    assert beam.sequences == greedy.sequences
    assert any(len(s) < 12 for s in greedy.sequences)


@pytest.mark.slow
def test_one_beam_is_greedy_real_model(real_model):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:4])
    greedy = generate(model, ids, mask, strategy="greedy", max_new_tokens=12)
    beam = generate(model, ids, mask, strategy="beam", num_beams=1, max_new_tokens=12)
    assert beam.sequences == greedy.sequences


def test_without_cache_same_result(llama):
    ids, mask = tiny_batch(3)
    eos = frequent_token(llama, ids, mask)
    a = generate(llama, ids, mask, strategy="beam", num_beams=3, max_new_tokens=8, eos_token_id=eos)
    b = generate(llama, ids, mask, strategy="beam", num_beams=3, max_new_tokens=8, eos_token_id=eos,
                 use_cache=False)
    assert a.sequences == b.sequences
    assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_stats_per_prompt_and_finished_prompts_leave_the_batch(llama):
    ids, mask = tiny_batch(0)
    eos = frequent_token(llama, ids, mask)
    out = generate(llama, ids, mask, strategy="beam", num_beams=2, num_return_sequences=2,
                   early_stopping=True, max_new_tokens=12, eos_token_id=eos)
    assert len(out.sequences) == 8 and len(out.scores) == 8 and len(out.stats) == 4
    for i, stat in enumerate(out.stats):
        assert stat.new_tokens == len(out.sequences[2 * i])  # stats describe the best sequence
        assert stat.finish_reason == ("eos" if out.sequences[2 * i][-1] == eos else "length")
        assert 1 <= stat.forward_passes <= 12
    assert min(s.forward_passes for s in out.stats) < max(s.forward_passes for s in out.stats)
    for i in range(4):  # best first
        assert out.scores[2 * i] >= out.scores[2 * i + 1]


# ---------------------------------------------------------------------------- GNMT + seed API
@pytest.mark.parametrize("alpha,m,top_k", [(1.2, 5.0, None), (0.6, 2.0, 3), (0.0, 5.0, 2)])
def test_gnmt_scores_recomputed(llama, alpha, m, top_k):
    ids, mask = tiny_batch(4)
    eos = frequent_token(llama, ids, mask)
    out = generate(llama, ids, mask, strategy="beam", num_beams=3, num_return_sequences=3,
                   length_style="gnmt", gnmt_min_length=m, length_penalty=alpha, expansion_top_k=top_k,
                   max_new_tokens=10, eos_token_id=eos)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    for i, (seq, score) in enumerate(zip(out.sequences, out.scores)):
        norm = ((m + len(seq)) / (m + 1)) ** alpha
        assert score == pytest.approx(sum_logprob(llama, prompts[i // 3], seq) / norm, abs=2e-4)
    assert LengthPenalty("gnmt", alpha, m)(7) == pytest.approx(((m + 7) / (m + 1)) ** alpha)


def test_expansion_top_k_restricts_each_beam(llama):
    """With top_k=1 every beam can only follow its argmax: the search collapses to greedy."""
    ids, mask = tiny_batch(5)
    greedy = generate(llama, ids, mask, strategy="greedy", max_new_tokens=8)
    beam = generate(llama, ids, mask, strategy="beam", num_beams=3, expansion_top_k=1, max_new_tokens=8)
    assert beam.sequences == greedy.sequences


def test_seed_api_is_gnmt_beam_search(llama):
    prompt = [5, 17, 42, 8, 60]
    eos = 3
    seq = beam_search_generate(prompt, llama, max_gen_len=10, num_beams=4, top_k=3, min_length=5.0,
                               alpha=1.2, eos_tokens_id=eos, pad_token_id=PAD)
    out = generate(llama, [prompt], strategy="beam", num_beams=4, expansion_top_k=3, length_style="gnmt",
                   gnmt_min_length=5.0, length_penalty=1.2, max_new_tokens=10, eos_token_id=eos)
    assert seq == out.sequences[0]
    # the cumulative log-prob starts at 0 (the seed started at 1.0): score = logp / penalty exactly
    norm = ((5.0 + len(seq)) / 6.0) ** 1.2
    assert out.scores[0] == pytest.approx(sum_logprob(llama, prompt, seq) / norm, abs=2e-4)


def test_temperature_reshapes_the_scores(llama):
    ids, mask = tiny_batch(6)
    cold = generate(llama, ids, mask, strategy="beam", num_beams=2, temperature=0.5, max_new_tokens=6)
    plain = generate(llama, ids, mask, strategy="beam", num_beams=2, max_new_tokens=6)
    assert cold.scores != pytest.approx(plain.scores, abs=1e-3)
    assert all(math.isfinite(s) for s in cold.scores)


# ---------------------------------------------------------------------------- debug
def test_debug_trace(llama):
    ids, mask = tiny_batch(7)
    out = generate(llama, ids, mask, strategy="beam", num_beams=3, max_new_tokens=5, debug=True)
    trace = out.debug
    assert [entry["step"] for entry in trace] == list(range(len(trace)))
    first = trace[0]["prompts"][0]
    assert len(first["beams"]) == 3 and all(len(b["tokens"]) == 1 for b in first["beams"])
    scores = [b["score"] for b in first["beams"]]
    assert scores == sorted(scores, reverse=True) and scores[0] < 0
    text = format_beam_trace(trace)
    assert text.startswith("step 1  prompt 0") and "beam 3" in text and "done" in text


@pytest.mark.slow
def test_debug_trace_text_real_model(real_model):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:1])
    out = generate(model, ids, mask, strategy="beam", num_beams=2, max_new_tokens=3, debug=True, tokenizer=tok)
    shown = format_beam_trace(out.debug, tok)
    second = out.debug[1]["prompts"][0]["beams"][0]
    assert second["text"] == tok.decode(second["tokens"]) and repr(second["text"]) in shown
    assert len(out.debug[-1]["prompts"][0]["finished"]) >= 1  # the last step ends every beam


# ---------------------------------------------------------------------------- bad input
class _ExplodingForward:
    """Context: the model's forward raises, proving validation happens before any work."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.forward = lambda *a, **k: pytest.fail("model ran before validation")
        return self.model

    def __exit__(self, *exc):
        del self.model.forward


@pytest.mark.parametrize(
    "options,needle",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2.5), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(early_stopping="maybe"), "early_stopping"),
        (dict(early_stopping=1), "early_stopping"),
        (dict(length_style="gnmt", length_penalty=-0.5), "length_penalty"),
        (dict(length_style="wu"), "length_style"),
        (dict(gnmt_min_length=-1.0), "gnmt_min_length"),
        (dict(expansion_top_k=0), "expansion_top_k"),
        (dict(beam_width=3), "beam_width"),
    ],
)
def test_bad_input_rejected_before_work(llama, options, needle):
    with _ExplodingForward(llama) as model, pytest.raises(DecodeKitError, match=needle):
        generate(model, [[5, 6, 7]], strategy="beam", max_new_tokens=4, **options)


def test_negative_length_penalty_allowed_with_hf(llama):
    out = generate(llama, [[5, 6, 7]], strategy="beam", num_beams=2, length_penalty=-1.0, max_new_tokens=3)
    assert len(out.sequences) == 1


@pytest.mark.slow
def test_stop_string_ends_hypotheses(real_model):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:1])  # "What is the capital of France?"
    out = generate(model, ids, mask, strategy="beam", num_beams=2, num_return_sequences=2, max_new_tokens=10,
                   stop_strings=[" France"], tokenizer=tok)
    texts = out.texts(tok)
    assert any(t.endswith(" France") for t in texts)
    for t in texts:  # a hypothesis ends at the first stop string, never runs past it
        assert " France" not in t or t.endswith(" France")
    if texts[0].endswith(" France"):
        assert out.stats[0].finish_reason == "stop_string"
