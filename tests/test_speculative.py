"""Speculative decoding: greedy == greedy decoding (tiny models and the bundled model),
sampling follows the target's distribution, ragged batches, zero drafts, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

import decodekit
from decodekit import DecodeKitError, Draft, Drafter, generate, speculative_generate
from decodekit.seed import GreedyProcessor, MultinomialProcessor
from decodekit.strategies.speculative import early_exit_model
from decodekit.visual import render_drafts

from conftest import CHAT_PROMPTS, EOS, chat_batch, tiny_gemma3, tiny_llama

ROWS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]  # ragged, one 1-token prompt


pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy(model, rows, n=20, **kw):
    return generate(model, rows, strategy="greedy", max_new_tokens=n, eos_token_id=[], **kw).sequences


def _spec(model, rows, n=20, **kw):
    kw.setdefault("eos_token_id", [])
    kw.setdefault("draft_policy", "fixed")  # the loop's mechanics: gamma drafts every step
    return generate(model, rows, strategy="speculative", max_new_tokens=n, **kw)


# ---------------------------------------------------------------------------- greedy, tiny models
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_identical_every_drafter_policy_and_first_target(arch):
    make = tiny_llama if arch == "llama" else tiny_gemma3
    target, other = make(0, layers=3), make(1, layers=1)
    want = _greedy(target, ROWS)
    drafters = {"separate": other, "layers:1": "layers:1", "layers:2": "layers:2", "itself": target}
    combos = itertools.product(drafters.items(), ["fixed", "egag", "cost"])
    for i, ((name, drafter), policy) in enumerate(combos):
        first = i % 2 == 0
        out = _spec(target, ROWS, drafter=drafter, gamma=3, draft_policy=policy, first_target=first)
        assert out.sequences == want, (name, policy, first)
        if policy != "cost":  # cost may rightly decide that drafting does not pay
            assert all(s.drafted > 0 for s in out.stats)


def test_greedy_identical_batch_one_and_without_cache(llama):
    drafter = tiny_llama(5, layers=1)
    for row in ROWS[:2]:
        assert _spec(llama, [row], drafter=drafter, gamma=4).sequences == _greedy(llama, [row])
    assert _spec(llama, ROWS, drafter=drafter, gamma=2, use_cache=False).sequences == _greedy(llama, ROWS)


def test_eos_and_max_new_tokens_cut_mid_draft(llama):
    want = generate(llama, ROWS, strategy="greedy", max_new_tokens=7, eos_token_id=[EOS, 40]).sequences
    out = _spec(llama, ROWS, n=7, drafter=llama, gamma=5, eos_token_id=[EOS, 40])
    assert out.sequences == want
    assert all(len(s) <= 7 for s in out.sequences)


def test_stats_count_forwards_and_acceptance(llama):
    out = _spec(llama, [ROWS[0]], n=21, drafter=llama, gamma=4)  # drafter == target: all accepted
    s = out.stats[0]
    assert s.acceptance_rate == 1.0 and s.drafted == s.accepted
    steps = len(s.accept_lengths)
    assert s.forward_passes == 1 + steps  # prefill + one verify forward per step
    assert s.new_tokens == 1 + s.accepted + steps  # first token + accepted + bonus per step
    assert s.acceptance_histogram == {4: steps} and s.position_acceptance == [1.0] * 4
    assert s.drafter_forwards == 4 * steps  # k forwards per step (prompt/pending fed by the first)


# ---------------------------------------------------------------------------- zero / ragged drafts
class FixedDrafter(Drafter):
    """Deterministic drafter: row i proposes ``per_row[i]`` copies of ``token``."""

    name = "fixed-test"

    def __init__(self, token: int, per_row: list[int]):
        self.token, self.per_row = token, list(per_row)

    def propose(self, rows, k):
        drafted = torch.tensor([min(k, n) for n in self.per_row[: len(rows)]])
        return Draft(torch.full((len(rows), k), self.token), drafted)

    def select_rows(self, index):
        self.per_row = [self.per_row[i] for i in index.tolist()]


def test_zero_and_ragged_deterministic_drafts_are_exact(gemma):
    want = _greedy(gemma, ROWS)
    zero = _spec(gemma, ROWS, drafter=FixedDrafter(7, [0, 0, 0, 0]), gamma=3)
    assert zero.sequences == want
    assert all(s.drafted == 0 and s.acceptance_rate == 0.0 and s.mean_accepted_length == 1.0 for s in zero.stats)
    tok = want[0][1]  # a token the target does emit: some drafts get accepted
    ragged = _spec(gemma, ROWS, drafter=FixedDrafter(tok, [3, 0, 2, 1]), gamma=3)
    assert ragged.sequences == want
    assert [s.drafted > 0 for s in ragged.stats] == [True, False, True, True]


def test_first_target_false_with_zero_drafts_is_plain_decoding(llama):
    out = _spec(llama, ROWS, drafter=FixedDrafter(7, [0] * 4), gamma=2, first_target=False)
    assert out.sequences == _greedy(llama, ROWS)


# ---------------------------------------------------------------------------- sampling is lossless
SV = 16  # small vocabulary: exact distributions are cheap


def _peaked(seed: int, layers: int, scale: float):
    model = tiny_llama(seed, layers=layers, vocab=SV)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # far from uniform, and different per seed
    return model


@torch.inference_mode()
def _exact_marginals(model, prompt: list[int]) -> list[torch.Tensor]:
    """Exact marginal distributions of the first 3 sampled tokens (temperature 1)."""
    def probs(seqs):
        return torch.softmax(model(torch.tensor(seqs)).logits[:, -1].float(), -1)

    p1 = probs([prompt])[0]  # [V]
    p2 = probs([prompt + [a] for a in range(SV)])  # [V, V] p(b | a)
    p3 = probs([prompt + [a, b] for a in range(SV) for b in range(SV)]).reshape(SV, SV, SV)
    m2 = p1 @ p2
    m3 = torch.einsum("a,ab,abc->c", p1, p2, p3)
    return [p1, m2, m3]


def _tv_by_position(seqs, exact) -> list[float]:
    tvs = []
    for pos, p in enumerate(exact):
        tokens = torch.tensor([s[pos] for s in seqs])
        freq = torch.bincount(tokens, minlength=SV).float() / len(tokens)
        tvs.append(0.5 * float((freq - p).abs().sum()))
    return tvs


@pytest.fixture(scope="module")
def sampling_pair():
    target, drafter = _peaked(0, 2, 12.0), _peaked(1, 1, 12.0)
    prompt = [5, 6, 7]
    return target, drafter, prompt, _exact_marginals(target, prompt)


N_SAMPLES = 6000
# E[TV] of 6000 samples over 16 values is <= 0.5 * sqrt(16 / 6000) ~ 0.026; 0.06 is > 2x that.
TV_BOUND = 0.06


@pytest.mark.parametrize("first_target", [True, False])
def test_sampling_follows_the_target_distribution(sampling_pair, first_target):
    target, drafter, prompt, exact = sampling_pair
    out = _spec(target, [prompt] * N_SAMPLES, n=3, drafter=drafter, gamma=3, temperature=1.0, seed=1,
                first_target=first_target)
    stats = out.stats[0]
    assert all(len(s) == 3 for s in out.sequences)
    rate = sum(s.accepted for s in out.stats) / sum(s.drafted for s in out.stats)
    assert 0.05 < rate < 0.95  # drafter really differs: both branches exercised
    assert max(_tv_by_position(out.sequences, exact)) < TV_BOUND, stats


def test_skip_sample_adjustment_is_detectably_different(sampling_pair):
    target, drafter, prompt, exact = sampling_pair
    out = _spec(target, [prompt] * N_SAMPLES, n=3, drafter=drafter, gamma=3, temperature=1.0, seed=1,
                skip_sample_adjustment=True, first_target=False)
    assert max(_tv_by_position(out.sequences, exact)) > 0.1  # measured: 0.13 lossy vs 0.02 exact


def test_p_equal_q_accepts_all_without_nan(llama):
    out = _spec(llama, ROWS * 8, n=12, drafter=llama, gamma=4, temperature=0.7, top_k=20, seed=3)
    assert all(s.acceptance_rate == 1.0 for s in out.stats)
    assert all(0 <= t < 97 for seq in out.sequences for t in seq)


def test_sampling_is_reproducible_with_a_seed(llama):
    drafter = tiny_llama(2, layers=1)
    a = _spec(llama, ROWS, drafter=drafter, temperature=1.0, top_p=0.9, seed=11).sequences
    b = _spec(llama, ROWS, drafter=drafter, temperature=1.0, top_p=0.9, seed=11).sequences
    assert a == b


# ---------------------------------------------------------------------------- API, trace, bad input
def test_seed_api_matches_autoregressive(llama):
    drafter = tiny_llama(3, layers=1)
    tokens, rate = speculative_generate([5, 6, 7], drafter, llama, gamma=3, max_gen_len=15, eos_tokens_id=EOS)
    assert tokens == decodekit.autoregressive_generate([5, 6, 7], llama, max_gen_len=15, eos_tokens_id=EOS)
    assert 0.0 <= rate <= 1.0
    tokens2, _ = speculative_generate([5, 6, 7], drafter, llama, use_egag=True, gamma_max=6, egag_ema_beta=0.5,
                                      max_gen_len=15, eos_tokens_id=EOS, use_cache=True,
                                      logits_processor=GreedyProcessor())
    assert tokens2 == tokens
    sampled, _ = speculative_generate([5, 6], drafter, llama, logits_processor=MultinomialProcessor(1.0),
                                      max_gen_len=5, eos_tokens_id=EOS)
    assert 1 <= len(sampled) <= 5


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_show_drafts_trace_and_rendering(llama):
    drafter = tiny_llama(4, layers=1)
    out = _spec(llama, ROWS[:2], drafter=drafter, gamma=3, show_drafts=True)
    for seq, trace, stats in zip(out.sequences, out.debug, out.stats):
        assert [t for t, _ in trace] == seq
        kinds = [k for _, k in trace]
        assert kinds[0] == "target" and kinds.count("draft") == stats.accepted
        assert set(kinds) <= {"target", "draft", "recovered", "bonus"}
    plain = render_drafts(_CharTokenizer(), out.debug[0], color=False)
    assert plain.replace("[", "").replace("]", "").replace("{", "").replace("}", "") == _CharTokenizer().decode(
        out.sequences[0])
    colored = render_drafts(_CharTokenizer(), out.debug[0], color=True)
    assert "\033[" in colored
    both = render_drafts(out.debug, _CharTokenizer(), color=False)  # CLI order, all rows
    assert both.count("\n\n") == 2 and "legend" in both


def test_early_exit_model_shares_weights(llama):
    view = early_exit_model(llama, 1)
    assert view.model.layers[0] is llama.model.layers[0] and len(view.model.layers) == 1
    assert view.lm_head.weight.data_ptr() == llama.lm_head.weight.data_ptr()
    assert len(llama.model.layers) == 2 and llama.config.num_hidden_layers == 2  # target untouched


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(drafter=tiny_llama(1, vocab=50)), "vocabulary"),
        (dict(drafter="layers:1", gamma=0), "gamma"),
        (dict(drafter="layers:1", gamma_min=4, gamma_max=2), "gamma_min"),
        (dict(drafter="layers:1", egag_ema_beta=1.0), "egag_ema_beta"),
        (dict(drafter="layers:1", egag_ema_beta=-0.1), "egag_ema_beta"),
        (dict(drafter="layers:1", draft_policy="greedyish"), "draft_policy"),
        (dict(drafter="layers:2"), "layers"),
        (dict(drafter="layers:x"), "layers"),
        (dict(drafter=tiny_llama(1).to("meta")), "device"),
        (dict(drafter=FixedDrafter(5, [1]), draft_policy="egag"), "egag"),
        (dict(drafter=None), "drafter"),
        (dict(drafter="layers:1", num_beams=2), "unknown option"),
    ],
)
def test_bad_input_is_rejected_before_work(llama, options, message):
    with pytest.raises(DecodeKitError, match=message):
        generate(llama, [[5, 6]], strategy="speculative", max_new_tokens=4, **options)


# ---------------------------------------------------------------------------- the bundled model
EXTRA_PROMPTS = [
    "Count from one to ten.",
    "What is the opposite of hot?",
    "Name three colours of the rainbow.",
    "Spell the word 'cat' backwards.",
    "What is 2 + 2?",
    "Describe a cat in five words.",
    "What day comes after Monday?",
    "Say hello in French.",
]
PROMPTS_12 = (CHAT_PROMPTS + EXTRA_PROMPTS)[:12]  # 3 batches of 4: each policy on a batch, each combo twice at batch 1
N_NEW = 16
POLICIES = ["fixed", "egag", "cost"]


@pytest.fixture(scope="module")
def bundled(real_model):
    model, tok = real_model
    batches = [chat_batch(tok, PROMPTS_12[i:i + 4]) for i in range(0, len(PROMPTS_12), 4)]
    want4 = [generate(model, ids, mask, max_new_tokens=N_NEW).sequences for ids, mask in batches]
    # A separate draft model object: the bundled model loaded again, cut to 6 layers.
    other, _ = decodekit.load_model(dtype="float32")
    del other.model.layers[6:]
    other.config.num_hidden_layers = 6
    return model, tok, batches, want4, other


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["layers", "separate"])
def test_bundled_greedy_identical_batch4(bundled, kind):
    """12 prompts, batches of 4 with left padding; the policy rotates over the batches."""
    model, _, batches, want4, other = bundled
    drafter = "layers:6" if kind == "layers" else other
    for b, ((ids, mask), want) in enumerate(zip(batches, want4)):
        policy = POLICIES[b % 3]
        out = generate(model, ids, mask, strategy="speculative", drafter=drafter, gamma=2, draft_policy=policy,
                       max_new_tokens=N_NEW)
        assert out.sequences == want, (b, policy)


class ReplayDrafter(Drafter):
    """Proposes the known greedy continuation with every 4th token corrupted: long accepted
    runs, rejections and bonus tokens on the real model at no drafting cost."""

    def __init__(self, prompts: list[list[int]], answers: list[list[int]]):
        self.full = [p + a for p, a in zip(prompts, answers)]

    def propose(self, rows, k):
        tokens = torch.zeros(len(rows), k, dtype=torch.long)
        for b, row in enumerate(rows):
            nxt = self.full[b][len(row):len(row) + k]
            tokens[b, :len(nxt)] = torch.tensor(nxt, dtype=torch.long)
            tokens[b, 3::4] += 1
        return Draft(tokens, torch.full((len(rows),), k))

    def select_rows(self, index):
        self.full = [self.full[i] for i in index.tolist()]


@pytest.mark.slow
def test_bundled_greedy_identical_long_accepted_runs(bundled):
    model, _, batches, want4, _ = bundled
    for (ids, mask), want in zip(batches, want4):
        prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
        for policy in ["fixed", "cost"]:
            out = generate(model, ids, mask, strategy="speculative", drafter=ReplayDrafter(prompts, want), gamma=6,
                           draft_policy=policy, max_new_tokens=N_NEW)
            assert out.sequences == want
            assert sum(s.accepted for s in out.stats) > 0.5 * sum(len(w) for w in want)


@pytest.mark.slow
def test_bundled_greedy_identical_batch1(bundled):
    """The same 12 prompts one at a time (every drafter kind x policy combination in turn),
    against the batched greedy reference: batch 1 and batch 4 agree too."""
    model, tok, _, want4, other = bundled
    want = [seq for batch in want4 for seq in batch]
    combos = list(itertools.product(["layers:4", other], POLICIES))
    for i, prompt in enumerate(PROMPTS_12):
        ids, mask = chat_batch(tok, [prompt])
        drafter, policy = combos[i % len(combos)]
        out = generate(model, ids, mask, strategy="speculative", drafter=drafter, gamma=2, draft_policy=policy,
                       max_new_tokens=N_NEW)
        assert out.sequences == [want[i]], (prompt, policy)


def test_prompt_rows_and_per_row_forwards(llama):
    from decodekit.cache import left_pad
    from decodekit.outputs import RowTracker
    from decodekit.seed import GreedyProcessor
    from decodekit.strategies.base import DecodeRequest

    ids, mask = left_pad(ROWS, 0)
    req = DecodeRequest(llama, ids, mask, GreedyProcessor(), RowTracker([1] * 4, max_new_tokens=4), 4)
    assert req.prompt_rows() == ROWS
    # a row that finishes early leaves the batch: it took part in fewer target forwards
    out = _spec(llama, ROWS, n=9, drafter=FixedDrafter(7, [0, 0, 0, 0]), eos_token_id=[EOS])
    for seq, s in zip(out.sequences, out.stats):
        assert s.forward_passes == len(seq) and s.drafter_forwards == 0  # no drafts: one token per forward
