"""History-aware processors and the pipeline, with transformers' own processors as the oracle."""

import numpy as np
import pytest
import torch
from transformers.generation import logits_process as tlp

from decodekit import (
    BadWords,
    DecodeKitError,
    LogitBias,
    LogitsPipeline,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopKProcessor,
    TopP,
    TypicalP,
    check_min_new_tokens,
    check_processor_options,
    make_pipeline,
)

V = 40


def random_case(seed, batch=4, length=12, alphabet=V):
    """Random logits ``[B, V]`` (some ties and negatives) and a history drawn from ``alphabet``
    tokens (a small alphabet makes repeats and n-grams likely)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=gen) * 3
    history = torch.randint(0, alphabet, (batch, length), generator=gen)
    return history, logits


def assert_same(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "different tokens were removed"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [0.6, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(seed, penalty):
    history, logits = random_case(seed)
    ours = RepetitionPenalty(penalty)
    assert_same(ours(history, logits), tlp.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone()))
    pads = torch.tensor([0, 3, 1, 7])  # left padding, ignored like transformers' attention-mask path
    want = tlp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)(history, logits.clone())
    assert_same(ours(history, logits, pad_lengths=pads), want)


def numpy_openai_penalties(history, logits, prompt_lengths, presence, frequency):
    """OpenAI: mu[j] -= c[j] * frequency + (c[j] > 0) * presence, c over generated tokens."""
    out = logits.numpy().astype(np.float64).copy()
    for row, start in enumerate(prompt_lengths):
        counts = np.bincount(history[row, start:].numpy(), minlength=out.shape[1])
        out[row] -= counts * frequency + (counts > 0) * presence
    return torch.from_numpy(out)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0)])
def test_presence_frequency_penalties_equal_numpy_over_generated_tokens(seed, presence, frequency):
    history, logits = random_case(seed, alphabet=10)
    prompt_lengths = [5, 0, 12, 9]
    got = PresenceFrequencyPenalty(presence, frequency)(history, logits, torch.tensor(prompt_lengths))
    want = numpy_openai_penalties(history, logits, prompt_lengths, presence, frequency)
    assert_same(got, want)
    # the prompt never counts: a token only in the prompt keeps its logit
    only_prompt = set(history[2].tolist())
    assert all(got[2, t] == logits[2, t] for t in only_prompt)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(seed, n):
    history, logits = random_case(seed, length=40, alphabet=3)
    want = tlp.NoRepeatNGramLogitsProcessor(n)(history, logits.clone())
    got = NoRepeatNGram(n)(history, logits)
    assert_same(got, want)
    assert torch.isinf(got).any()  # the small alphabet makes the test bite


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_equals_transformers(seed, min_p):
    _, logits = random_case(seed)
    assert_same(MinP(min_p)(None, logits), tlp.MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_equals_transformers(seed, mass):
    _, logits = random_case(seed)
    assert_same(TypicalP(mass)(None, logits), tlp.TypicalLogitsWarper(mass)(None, logits.clone()))


@pytest.mark.parametrize("seed", range(3))
def test_logit_bias_equals_sequence_bias(seed):
    _, logits = random_case(seed)
    bias = {3: -2.5, 17: 4.0, 0: 0.25, 39: -100.0}
    want = tlp.SequenceBiasLogitsProcessor([[[k], v] for k, v in bias.items()])(None, logits.clone())
    assert_same(LogitBias(bias)(None, logits), want)
    assert_same(LogitBias({str(k): v for k, v in bias.items()})(None, logits), want)  # OpenAI JSON keys


@pytest.mark.parametrize("seed", range(5))
def test_bad_words_equal_transformers(seed):
    history, logits = random_case(seed, length=15, alphabet=3)
    words = [[5], [1, 2], [0, 1], [2, 2, 0], [0, 1, 2, 9], [7], [11, 30]]
    want = tlp.NoBadWordsLogitsProcessor(words, eos_token_id=7)(history, logits.clone())
    assert_same(BadWords(words, eos_token_id=7)(history, logits), want)
    assert torch.isfinite(BadWords(words, eos_token_id=7)(history, logits)[:, 7]).all()  # EOS word dropped


def test_suppress_tokens_and_ignore_eos_equal_transformers():
    history, logits = random_case(0)
    want = tlp.SuppressTokensLogitsProcessor([1, 8, 33])(history, logits.clone())
    assert_same(SuppressTokens([1, 8, 33])(history, logits), want)
    pipe = make_pipeline(0.0, ignore_eos=True, eos_token_id=[2, 9])
    assert_same(pipe.process_logits(history, logits), tlp.SuppressTokensLogitsProcessor([2, 9])(history, logits))


@pytest.mark.parametrize("prompt_length", [4, 8, 9, 12])
def test_min_new_tokens_equals_transformers(prompt_length):
    history, logits = random_case(1)  # 12 tokens so far
    want = tlp.MinNewTokensLengthLogitsProcessor(prompt_length, 5, [3, 6])(history, logits.clone())
    assert_same(MinNewTokens(5, [3, 6])(history, logits, prompt_length), want)


def test_min_new_tokens_is_per_row():
    history, logits = random_case(2)
    got = MinNewTokens(3, 4)(history, logits, torch.tensor([12, 9, 10, 0]))  # 0, 3, 2, 12 new
    assert torch.isinf(got[:, 4]).tolist() == [True, False, True, False]


@pytest.mark.parametrize("seed", range(3))
def test_temperature_top_k_top_p_equal_transformers(seed):
    _, logits = random_case(seed)
    assert_same(Temperature(0.7)(None, logits), tlp.TemperatureLogitsWarper(0.7)(None, logits))
    assert_same(TopK(5)(None, logits), tlp.TopKLogitsWarper(5)(None, logits))
    for top_p in (0.3, 0.8, 0.95):
        assert_same(TopP(top_p)(None, logits), tlp.TopPLogitsWarper(top_p)(None, logits))


KNOBS = dict(
    repetition_penalty=1.4, no_repeat_ngram_size=2, bad_words_ids=[[1, 2], [6]], min_new_tokens=20,
    suppress_tokens=[11], logit_bias={4: 2.0, 5: -1.0},
)


def transformers_list(do_sample):
    """The same processors in the order transformers' ``_get_logits_processor`` builds them."""
    procs = [
        tlp.SequenceBiasLogitsProcessor([[[4], 2.0], [[5], -1.0]]),
        tlp.RepetitionPenaltyLogitsProcessor(1.4),
        tlp.NoRepeatNGramLogitsProcessor(2),
        tlp.NoBadWordsLogitsProcessor([[1, 2], [6]], eos_token_id=3),
        tlp.MinNewTokensLengthLogitsProcessor(8, 20, 3),
        tlp.SuppressTokensLogitsProcessor([11]),
    ]
    if do_sample:
        procs += [tlp.TemperatureLogitsWarper(0.8), tlp.TopKLogitsWarper(12), tlp.TopPLogitsWarper(0.9),
                  tlp.MinPLogitsWarper(0.05), tlp.TypicalLogitsWarper(0.95)]
    return tlp.LogitsProcessorList(procs)


@pytest.mark.parametrize("seed", range(4))
def test_pipeline_order_equals_transformers_list(seed):
    history, logits = random_case(seed, alphabet=8)
    sample = make_pipeline(0.8, 12, 0.9, min_p=0.05, typical_p=0.95, eos_token_id=3, **KNOBS)
    want = transformers_list(True)(history, logits.clone())
    assert_same(sample.process_logits(history, logits, prompt_lengths=8), want)
    torch.testing.assert_close(sample.process(history, logits, 8), torch.softmax(want, -1), atol=1e-6, rtol=0)
    greedy = make_pipeline(0, 12, 0.9, eos_token_id=3, **KNOBS)
    assert greedy.is_greedy and not sample.is_greedy
    want = transformers_list(False)(history, logits.clone())
    assert_same(greedy.process_logits(history, logits, prompt_lengths=8), want)
    assert torch.equal(greedy.sample(greedy.process(history, logits, 8)), want.argmax(-1))


def test_draft_positions_see_the_drafts_before_them():
    history, logits = random_case(0, length=10, alphabet=6)
    steps = torch.randn(4, 3, V)  # logits after history[:, :8], [:, :9], [:, :10]
    pipe = make_pipeline(0.9, top_k=7, repetition_penalty=1.5, presence_penalty=0.4, no_repeat_ngram_size=2)
    got = pipe.process(history, steps, prompt_lengths=torch.tensor([2, 3, 4, 5]))
    for j in range(3):
        one = pipe.process(history[:, : 8 + j], steps[:, j], prompt_lengths=torch.tensor([2, 3, 4, 5]))
        assert torch.equal(got[:, j], one)


class BanAfterTwo(tlp.LogitsProcessor):
    """A user's own transformers processor that reads the history: token 3 never follows 2."""

    def __call__(self, input_ids, scores):
        scores[input_ids[:, -1] == 2, 3] = -float("inf")  # in place, as users write them
        return scores


def test_users_transformers_processor_works_in_the_pipeline():
    history, logits = random_case(3, alphabet=4)
    history[0, -1], history[1, -1] = 2, 1
    before = logits.clone()
    user = tlp.LogitsProcessorList([BanAfterTwo(), tlp.TemperatureLogitsWarper(0.5)])
    pipe = make_pipeline(0.7, repetition_penalty=1.2, logits_processor=user)
    want = tlp.LogitsProcessorList(
        [tlp.RepetitionPenaltyLogitsProcessor(1.2), *user, tlp.TemperatureLogitsWarper(0.7)]
    )(history, logits.clone())
    got = pipe.process_logits(history, logits)
    assert_same(got, want)
    assert torch.isinf(got[0, 3]) and torch.isfinite(got[1, 3])
    assert torch.equal(logits, before)  # the in-place user processor touched a copy
    assert_same(LogitsPipeline([BanAfterTwo()]).process_logits(history, logits), BanAfterTwo()(history, logits.clone()))
    with pytest.raises(DecodeKitError, match="BanAfterTwo"):
        LogitsPipeline([BanAfterTwo()])(logits)  # needs the history


def test_seed_processor_combines_with_penalties():
    history, logits = random_case(4)
    seed = TopKProcessor(0.7, 5)
    pipe = make_pipeline(repetition_penalty=1.3, logits_processor=seed)
    want = tlp.LogitsProcessorList(
        [tlp.RepetitionPenaltyLogitsProcessor(1.3), tlp.TemperatureLogitsWarper(0.7), tlp.TopKLogitsWarper(5)]
    )(history, logits.clone())
    assert_same(pipe.process_logits(history, logits), want)
    assert isinstance(seed, LogitsPipeline) and not seed.needs_history
    torch.testing.assert_close(seed.process(history, logits), seed(logits))
    with pytest.raises(DecodeKitError, match="top_k"):
        make_pipeline(top_k=3, logits_processor=seed)


def test_min_p_sampling_matches_reference_distribution():
    """Chi-square of many draws against the min-p reference: keep p >= min_p * p_max, renormalise."""
    logits = torch.log(torch.tensor([0.25, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01]))
    pipe = make_pipeline(0.9, min_p=0.15)
    p = torch.softmax(logits.double() / 0.9, -1)
    expected = torch.where(p >= 0.15 * p.max(), p, torch.zeros_like(p))
    expected /= expected.sum()
    n = 40_000
    draws = pipe.sample(pipe(logits.expand(n, -1)), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=12).double()
    support = expected > 0
    assert counts[~support].sum() == 0 and 2 <= int(support.sum()) < 12
    exp_counts = expected[support] * n
    chi2 = (((counts[support] - exp_counts) ** 2) / exp_counts).sum().item()
    assert chi2 < 35, chi2  # 99.9th percentile of chi2 with <= 11 dof is 31.3


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(typical_p=2), "typical_p"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(logit_bias={V: 1.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(bad_words_ids=[[1, V + 5]]), "bad_words_ids"),
        (dict(bad_words_ids=[[]]), "bad_words_ids"),
        (dict(suppress_tokens=[V]), "suppress_tokens"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_options_name_the_parameter(options, match):
    with pytest.raises(DecodeKitError, match=match) as err:
        check_processor_options(options, vocab_size=V)
    assert "\n" not in str(err.value)
    with pytest.raises(DecodeKitError, match=match):
        make_pipeline(**options, vocab_size=V, eos_token_id=0)


def test_min_new_tokens_checks():
    check_min_new_tokens(5, 5)
    with pytest.raises(DecodeKitError, match="min_new_tokens"):
        check_min_new_tokens(6, 5)
    with pytest.raises(DecodeKitError, match="min_new_tokens"):
        make_pipeline(min_new_tokens=3)  # no EOS known
    check_processor_options(dict(min_p=0.0, typical_p=1.0, presence_penalty=-2, repetition_penalty=0.01), vocab_size=V)
