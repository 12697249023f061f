"""The sampling toolbox through generate: history processors stay exact under every strategy,
log-probabilities are the target's, bad input is one line (transformers is the oracle)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from decodekit import DecodeKitError, generate, prepare_inputs
from decodekit.cli import main
from test_speculative import SV, _peaked

from conftest import CHAT_PROMPTS, chat_batch, hf_new_tokens, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17], [20]]
PROCESSORS = [
    dict(repetition_penalty=1.3),
    dict(no_repeat_ngram_size=2),
    dict(presence_penalty=1.0, frequency_penalty=0.5),
    dict(repetition_penalty=0.8, no_repeat_ngram_size=3, logit_bias={7: 2.0}, suppress_tokens=[9]),
]
LOSSLESS = [("prompt_lookup", {}), ("ngram", {}), ("speculative", {"drafter": "layers:1"}), ("jacobi", {})]


def _hf_padded(model, rows, **kw):
    ids, mask = prepare_inputs(rows, None, 0)
    out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return ids, mask, out


# ---------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("kw", [PROCESSORS[0], PROCESSORS[1], {**PROCESSORS[0], **PROCESSORS[1]}])
def test_greedy_with_processors_equals_transformers(llama, kw):
    ids, _, out = _hf_padded(llama, ROWS, max_new_tokens=16, **kw)
    ours = generate(llama, ROWS, max_new_tokens=16, eos_token_id=[], pad_token_id=0, **kw)
    assert ours.sequences == out[:, ids.shape[1]:].tolist()
    plain = generate(llama, ROWS, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    assert plain.sequences != ours.sequences  # the processor really acted


@pytest.mark.parametrize("kw", PROCESSORS)
@pytest.mark.parametrize("strategy,extra", LOSSLESS)
def test_lossless_strategies_with_processors_equal_greedy(llama, strategy, extra, kw):
    ref = generate(llama, ROWS, max_new_tokens=20, eos_token_id=[], **kw).sequences
    for rows, want in ((ROWS, ref), (ROWS[:1], ref[:1])):  # batch 4 and batch 1
        out = generate(llama, rows, strategy=strategy, max_new_tokens=20, eos_token_id=[], **kw, **extra)
        assert out.sequences == want, (strategy, kw)


def test_beam_with_processors_equals_transformers(llama):
    kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)
    ids, _, out = _hf_padded(llama, ROWS, max_new_tokens=10, num_beams=3, **kw)
    ours = generate(llama, ROWS, strategy="beam", num_beams=3, max_new_tokens=10, eos_token_id=[],
                    pad_token_id=0, **kw)
    assert ours.sequences == out[:, ids.shape[1]:].tolist()


def test_users_transformers_processor_works_unchanged(llama):
    user = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])
    ref = generate(llama, ROWS, max_new_tokens=12, eos_token_id=[], repetition_penalty=1.3).sequences
    for strategy, extra in [("greedy", {}), *LOSSLESS[:1], LOSSLESS[2]]:
        out = generate(llama, ROWS, strategy=strategy, max_new_tokens=12, eos_token_id=[],
                       logits_processor=user, **extra)
        assert out.sequences == ref, strategy


def test_min_new_tokens_and_ignore_eos(llama):
    eos = generate(llama, [[5, 6, 7]], max_new_tokens=1).sequences[0][0]  # make the first token EOS
    out = generate(llama, [[5, 6, 7]], max_new_tokens=6, eos_token_id=eos)
    assert out.sequences[0] == [eos]
    assert eos not in generate(llama, [[5, 6, 7]], max_new_tokens=6, eos_token_id=eos,
                               min_new_tokens=3).sequences[0][:3]
    kept = generate(llama, [[5, 6, 7]], strategy="prompt_lookup", max_new_tokens=6, eos_token_id=eos,
                    ignore_eos=True)
    assert len(kept.sequences[0]) == 6 and eos not in kept.sequences[0]


# ---------------------------------------------------------------------------- log-probabilities
@pytest.mark.parametrize("strategy,extra", [("greedy", {}), *LOSSLESS])
def test_logprobs_are_transformers_output_scores(llama, strategy, extra):
    ids, _, hf = _hf_padded(llama, ROWS, max_new_tokens=12, repetition_penalty=1.2, output_scores=True,
                            return_dict_in_generate=True)
    ref = torch.stack(hf.scores, 1).log_softmax(-1)  # [B, T, V]
    out = generate(llama, ROWS, strategy=strategy, max_new_tokens=12, eos_token_id=[], pad_token_id=0,
                   logprobs=5, repetition_penalty=1.2, **extra)
    for b, entries in enumerate(out.logprobs):
        assert [e["token_id"] for e in entries] == out.sequences[b]
        for t, entry in enumerate(entries):
            assert entry["logprob"] == pytest.approx(ref[b, t, entry["token_id"]].item(), abs=1e-4)
            top = ref[b, t].topk(5)
            got = [a["logprob"] for a in entry["top_logprobs"]]
            assert got == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_under_sampling_are_the_target_distribution(llama):
    out = generate(llama, ROWS, strategy="speculative", drafter=tiny_llama(seed=4, layers=1), temperature=0.8,
                   top_k=20, seed=0, max_new_tokens=8, eos_token_id=[], logprobs=0)
    for b, seq in enumerate(out.sequences):
        history = ROWS[b] + seq
        logits = llama(torch.tensor([history])).logits[0, len(ROWS[b]) - 1 : -1].float() / 0.8
        kth = logits.topk(20, dim=-1).values[:, -1:]
        ref = logits.masked_fill(logits < kth, -float("inf")).log_softmax(-1)
        got = [e["logprob"] for e in out.logprobs[b]]
        assert got == pytest.approx(ref.gather(1, torch.tensor(seq)[:, None])[:, 0].tolist(), abs=1e-4)
        assert all(e["top_logprobs"] == [] for e in out.logprobs[b])


# ---------------------------------------------------------------------------- sampling, exactly
@torch.inference_mode()
def _exact_penalised(model, prompt: list[int], penalty: float) -> list[torch.Tensor]:
    """Exact marginals of the first 3 sampled tokens under transformers' repetition penalty."""
    proc = RepetitionPenaltyLogitsProcessor(penalty)

    def probs(seqs):
        ids = torch.tensor(seqs)
        return torch.softmax(proc(ids, model(ids).logits[:, -1].float()), -1)

    p1 = probs([prompt])[0]
    p2 = probs([prompt + [a] for a in range(SV)])
    p3 = probs([prompt + [a, b] for a in range(SV) for b in range(SV)]).reshape(SV, SV, SV)
    return [p1, p1 @ p2, torch.einsum("a,ab,abc->c", p1, p2, p3)]


def test_sampling_with_a_penalty_under_speculation_is_exact():
    target, drafter, prompt = _peaked(0, 2, 12.0), _peaked(1, 1, 12.0), [5, 6, 7]
    exact = _exact_penalised(target, prompt, 0.3)  # < 1: repeats favoured, a big change
    n = 6000
    for strategy, extra in [("sample", {}), ("speculative", {"drafter": drafter, "gamma": 3})]:
        out = generate(target, [prompt] * n, strategy=strategy, temperature=1.0, seed=2, max_new_tokens=3,
                       eos_token_id=[], repetition_penalty=0.3, **extra)
        for pos, p in enumerate(exact):
            freq = torch.bincount(torch.tensor([s[pos] for s in out.sequences]), minlength=SV).float() / n
            assert 0.5 * float((freq - p).abs().sum()) < 0.06, (strategy, pos)  # E[TV] ~ 0.026
    plain = _exact_penalised(target, prompt, 1.0)
    assert min(0.5 * float((a - b).abs().sum()) for a, b in zip(plain, exact)) > 0.2  # ignoring it fails


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=-0.1), "typical_p"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(logit_bias={500: 1.0}), "logit_bias"),
    (dict(min_new_tokens=9), "min_new_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(strategy="beam", logprobs=2), "logprobs"),
    (dict(strategy="eis", repetition_penalty=1.2), "repetition_penalty"),
])
def test_bad_input_is_one_line_before_any_work(kw, match):
    model = tiny_llama()
    model.forward = None  # any model call would raise TypeError
    with pytest.raises(DecodeKitError, match=match) as err:
        generate(model, [[5, 6, 7]], max_new_tokens=8, **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv,match", [
    (["--repetition_penalty", "-1"], "repetition_penalty"),
    (["--min_p", "2"], "min_p"),
    (["--min_new_tokens", "50", "--max_new_tokens", "8"], "min_new_tokens"),
    (["--logprobs", "30"], "logprobs"),
    (["--strategy", "beam", "--logprobs", "1"], "logprobs"),
])
def test_cli_processor_flags_checked_before_loading(monkeypatch, capsys, argv, match):
    monkeypatch.setattr("decodekit.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


# ---------------------------------------------------------------------------- the bundled model
@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=3)])
def test_real_model_processors_equal_transformers_and_stay_lossless(real_model, kw):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:4])
    ref = hf_new_tokens(model, ids, mask, max_new_tokens=24, do_sample=False, **kw)
    ours = generate(model, ids, mask, max_new_tokens=24, **kw)
    assert ours.sequences == ref
    for strategy, extra in [("prompt_lookup", {}), ("speculative", {"drafter": "layers:24", "gamma": 3})]:
        out = generate(model, ids, mask, strategy=strategy, max_new_tokens=24, **kw, **extra)
        assert out.sequences == ref, strategy


@pytest.mark.slow
def test_real_model_logprobs_equal_transformers_scores(real_model):
    model, tok = real_model
    ids, mask = chat_batch(tok, CHAT_PROMPTS[:1])
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True,
                        return_dict_in_generate=True)
    ref = torch.stack(hf.scores, 1).log_softmax(-1)[0]
    out = generate(model, ids, mask, strategy="prompt_lookup", max_new_tokens=12, logprobs=5)
    for t, entry in enumerate(out.logprobs[0]):
        assert entry["logprob"] == pytest.approx(ref[t, entry["token_id"]].item(), abs=1e-4)
        assert [a["token_id"] for a in entry["top_logprobs"]] == ref[t].topk(5).indices.tolist()


# ---------------------------------------------------------------------------- n samples per prompt
# fixed drafting: the default cost policy picks draft widths from timings, and under sampling
# the widths decide how the seeded generator is consumed, so two runs need not draw alike
@pytest.mark.parametrize("strategy,extra", [("sample", {}),
                                            ("speculative", {"drafter": "layers:1", "draft_policy": "fixed"}),
                                            ("prompt_lookup", {"draft_policy": "fixed"})])
def test_n_samples_share_one_prefill_and_equal_repeated_prompts(llama, strategy, extra):
    rows = ROWS[:3]
    batches = []
    hook = llama.register_forward_hook(lambda mod, args, kw, out: batches.append(kw["input_ids"].shape),
                                       with_kwargs=True)
    try:
        out = generate(llama, rows, strategy=strategy, num_return_sequences=4, temperature=0.9, seed=5,
                       max_new_tokens=10, eos_token_id=[], **extra)
    finally:
        hook.remove()
    prefill_rows = [shape[0] for shape in batches if shape[1] > 1][0]
    assert prefill_rows == 3  # each prompt prefilled once, then forked to its 4 rows
    assert len(out.sequences) == 12 and len(out.stats) == 12
    repeated = [r for r in rows for _ in range(4)]
    ref = generate(llama, repeated, strategy=strategy, temperature=0.9, seed=5, max_new_tokens=10,
                   eos_token_id=[], **extra)
    assert out.sequences == ref.sequences  # sharing the prefill changes nothing
    assert len({tuple(s) for s in out.sequences[:4]}) > 1  # real samples, not copies


def test_n_samples_need_sampling(llama):
    with pytest.raises(DecodeKitError, match="num_return_sequences"):
        generate(llama, ROWS, num_return_sequences=2)
    with pytest.raises(DecodeKitError, match="num_return_sequences must be >= 1"):
        generate(llama, ROWS, strategy="sample", num_return_sequences=0)


def test_cli_writes_n_records_per_prompt(tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "n.jsonl"
    assert main(["generate", "--model_path", str(tiny_model_dir), "--prompt", "hello there",
                 "--strategy", "sample", "--num_return_sequences", "3", "--seed", "1", "--max_new_tokens", "5",
                 "--output_file", str(out), "--dtype", "float32", "--logprobs", "1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample_index"]) for r in records] == [(0, 0), (0, 1), (0, 2)]
    assert all(len(r["logprobs"]) == r["response_length"] for r in records)
