import pytest
import torch

import decodekit as dk
from decodekit import GreedyProcessor, autoregressive_generate, left_pad

from conftest import CHAT_PROMPTS, EOS, chat_batch, hf_new_tokens

ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]


def test_greedy_equals_transformers_batched_left_padded(tiny_model):
    ids, mask = left_pad(ROWS, 0)
    ref = hf_new_tokens(tiny_model, ids, mask, max_new_tokens=20, do_sample=False)
    out = dk.generate(tiny_model, ids, mask, max_new_tokens=20)
    assert out.sequences == ref
    for row, stat in zip(out.sequences, out.stats):
        assert stat.new_tokens == len(row)
        assert stat.forward_passes == len(row)  # prefill + one forward per later token


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_greedy_applies_processors_that_need_no_history(tiny_model, strategy):
    """suppress_tokens and logit_bias change greedy's and beam's tokens as in transformers (the
    plain-argmax shortcut once skipped every step that reads no history)."""
    ids, mask = left_pad(ROWS, 0)
    free = dk.generate(tiny_model, ids, mask, max_new_tokens=8).sequences
    banned, favoured = free[0][0], free[1][1]
    beams = {"num_beams": 2} if strategy == "beam" else {}
    out = dk.generate(tiny_model, ids, mask, max_new_tokens=8, strategy=strategy, suppress_tokens=[banned],
                      logit_bias={favoured: 4.0}, **beams)
    ref = hf_new_tokens(tiny_model, ids, mask, max_new_tokens=8, do_sample=False, suppress_tokens=[banned],
                        sequence_bias={(favoured,): 4.0}, **beams)
    assert out.sequences == ref and all(banned not in row for row in out.sequences)


def test_batched_equals_one_row_at_a_time(llama):
    batched = dk.generate(llama, ROWS, max_new_tokens=12).sequences
    single = [dk.generate(llama, [r], max_new_tokens=12).sequences[0] for r in ROWS]
    assert batched == single


def test_no_cache_path_gives_the_same_tokens(llama):
    assert dk.generate(llama, ROWS, max_new_tokens=10, use_cache=False).sequences == \
        dk.generate(llama, ROWS, max_new_tokens=10).sequences


def test_per_row_eos_stops_only_that_row(llama):
    free = dk.generate(llama, ROWS, max_new_tokens=15, eos_token_id=[]).sequences
    stop = free[0][3]  # make row 0's 4th token the EOS
    out = dk.generate(llama, ROWS, max_new_tokens=15, eos_token_id=stop)
    assert out.sequences[0] == free[0][: free[0].index(stop) + 1]
    assert out.stats[0].finish_reason == "eos"
    for b in range(1, len(ROWS)):
        want = free[b][: free[b].index(stop) + 1] if stop in free[b] else free[b]
        assert out.sequences[b] == want
    # the finished row left the batch: it took part in fewer forwards
    assert out.stats[0].forward_passes == len(out.sequences[0])


def test_seeded_sampling_is_reproducible(llama):
    a = dk.generate(llama, ROWS, strategy="sample", temperature=1.0, seed=7, max_new_tokens=10)
    b = dk.generate(llama, ROWS, strategy="sample", temperature=1.0, seed=7, max_new_tokens=10)
    c = dk.generate(llama, ROWS, strategy="sample", temperature=1.0, seed=8, max_new_tokens=10)
    assert a.sequences == b.sequences
    assert a.sequences != c.sequences


def test_sampling_draws_from_the_model_distribution(llama):
    """First sampled token over many identical rows vs the processed model distribution."""
    prompt = [5, 6, 7, 8]
    n = 3000
    out = dk.generate(llama, [prompt] * n, strategy="sample", temperature=1.3, top_k=8, top_p=0.9,
                      seed=0, max_new_tokens=1, eos_token_id=[])
    with torch.no_grad():
        logits = llama(torch.tensor([prompt])).logits[0, -1]
    expected = dk.make_processor(1.3, 8, 0.9)(logits[None])[0].double()
    counts = torch.bincount(torch.tensor([s[0] for s in out.sequences]), minlength=logits.shape[0]).double()
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    exp = expected[support] * n
    chi2 = (((counts[support] - exp) ** 2) / exp).sum().item()
    assert chi2 < 30, chi2  # 99.9th pct of chi2 with <= 7 dof is 24.3
    tv = 0.5 * (counts / n - expected).abs().sum().item()
    assert tv < 0.05


def test_seed_api_matches_generate(llama):
    toks = autoregressive_generate(ROWS[0], llama, max_gen_len=9, logits_processor=GreedyProcessor(),
                                   eos_tokens_id=EOS, use_cache=False)
    assert toks == dk.generate(llama, [ROWS[0]], max_new_tokens=9, eos_token_id=EOS).sequences[0]


def test_streamer_receives_every_token(llama):
    got = {}
    out = dk.generate(llama, ROWS, max_new_tokens=6, streamer=lambda row, t: got.setdefault(row, []).extend(t))
    assert [got[b] for b in range(len(ROWS))] == out.sequences


@pytest.mark.slow
def test_real_model_greedy_equals_transformers(real_model):
    model, tok = real_model
    prompts = CHAT_PROMPTS[:10]
    ids, mask = chat_batch(tok, prompts)
    ref = hf_new_tokens(model, ids, mask, max_new_tokens=24, do_sample=False)
    assert dk.generate(model, ids, mask, max_new_tokens=24).sequences == ref
    for b in (0, 3, 9):  # single prompts, no padding
        sid, smask = chat_batch(tok, [prompts[b]])
        assert dk.generate(model, sid, smask, max_new_tokens=24).sequences[0] == ref[b]


@pytest.mark.slow
def test_real_model_stop_strings(real_model):
    model, tok = real_model
    ids, mask = chat_batch(tok, ["Count from 1 to 20, separated by commas."])
    free = dk.generate(model, ids, mask, max_new_tokens=40)
    text = tok.decode(free.sequences[0])
    assert "5" in text
    out = dk.generate(model, ids, mask, max_new_tokens=40, stop_strings=["5"], tokenizer=tok)
    assert out.stats[0].finish_reason == "stop_string"
    assert tok.decode(out.sequences[0]).rstrip().endswith("5")
    assert len(out.sequences[0]) < len(free.sequences[0])
