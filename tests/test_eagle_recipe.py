"""The head's training objective and held-out measure (``strategies/eagle/recipe.py``): the
batched unroll equals drafting one start at a time, acceptance counts conditional depths, the
loss trains every depth; and the varied training prompts keep the held-out suites out."""

from __future__ import annotations

import random

import pytest
import torch

from decodekit import DecodeKitError
from decodekit.strategies.eagle import EagleHead, additive_mask
from decodekit.strategies.eagle.prompts import (
    HELD_OUT_WORDS,
    KINDS,
    kind_of,
    mentions_held_out,
    passage_prompts,
    training_prompts,
)
from decodekit.strategies.eagle.recipe import (
    Recipe,
    acceptance,
    expected_accepted,
    loss,
    make_batch,
    topk_hits,
    unroll,
)

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(length: int, prompt: int, hidden: int, vocab: int, gen: torch.Generator) -> dict:
    """A synthetic training answer: random features, tokens and greedy labels (-1 in the prompt)."""
    greedy = torch.randint(0, vocab, (length - 1,), generator=gen)
    greedy[: prompt - 1] = -1
    top_ids = torch.randint(0, vocab, (length - 1, 4), generator=gen)
    top_ids[:, 0] = greedy.clamp_min(0)
    return dict(tokens=torch.randint(0, vocab, (length,), generator=gen), features=torch.randn(length - 1, hidden,
                generator=gen), greedy=greedy, top_ids=top_ids, top_p=torch.full((length - 1, 4), 0.25),
                prompt=prompt, greedy_answer=True)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(0, layers=2)
    torch.manual_seed(1)
    head = EagleHead(model).eval()
    gen = torch.Generator().manual_seed(0)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    samples = [_sample(n, p, hidden, vocab, gen) for n, p in ((14, 3), (9, 2), (11, 5))]
    return model, head, samples


@torch.no_grad()
def _one_start(head, batch: dict, row: int, t: int, depth: int) -> list[torch.Tensor]:
    """Drafting from start ``t`` the plain way: the true pairs ``0..t``, then each prediction
    fed back with the next true token, one growing causal sequence per step."""
    feats = batch["feats_in"][row, : t + 1]  # [t+1, H]
    tokens = batch["tokens"][row, : t + 1]
    out = []
    for d in range(depth):
        n = feats.shape[0]
        pred = head(feats[None], tokens[None], torch.arange(n)[None],
                    additive_mask(torch.ones(1, n, dtype=torch.long), n, torch.float32))[0, -1]
        out.append(pred)
        feats = torch.cat([feats, pred[None]])
        tokens = torch.cat([tokens, batch["tokens"][row, t + d + 1: t + d + 2]])
    return out


def test_unroll_equals_drafting_each_start_alone(setup):
    _, head, samples = setup
    batch = make_batch(samples, None)
    with torch.no_grad():
        preds = unroll(head, batch, 3)
    lengths = batch["mask"].sum(-1).tolist()
    checked = 0
    for row, length in enumerate(lengths):
        for t in range(length - 3):
            for d, expected in enumerate(_one_start(head, batch, row, t, 3)):
                torch.testing.assert_close(preds[d][row, t], expected, atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked > 50


def _with_depth1_labels(samples: list[dict], labels: torch.Tensor) -> list[dict]:
    """Copies of ``samples`` whose trained greedy labels are ``labels [B, L]`` (depth 1's)."""
    rigged = []
    for row, s in enumerate(samples):
        s = dict(s, greedy=s["greedy"].clone())
        m = s["tokens"].shape[0] - 2
        trained = s["greedy"][1: m + 1] != -1
        s["greedy"][1: m + 1] = torch.where(trained, labels[row, :m], -1)
        rigged.append(s)
    return rigged


def test_acceptance_is_conditional_on_earlier_depths(setup):
    """Labels set to the head's own argmax at depth 1 and 2 only: depth 1 and 2 always right,
    depth 3 right by chance only."""
    _, head, samples = setup
    batch = make_batch(samples, None)
    with torch.no_grad():
        preds = unroll(head, batch, 2)
    firsts = head.logits(preds[0]).argmax(-1)  # [B, L]
    rigged = _with_depth1_labels(samples, firsts)
    rates = acceptance(head, rigged, 3)
    assert rates[0] == 1.0 and rates[1] < 0.5  # depth 2 sees other inputs than depth 1's labels
    assert expected_accepted([1.0, 0.5, 0.5], gamma=2) == 1.5


def test_topk_hits_count_the_first_drafts_a_tree_would_hold(setup):
    """Labels set to the head's second choice at depth 1: top-1 never holds them, top-2 always;
    top-1 on the true labels is depth-1 acceptance."""
    model, head, samples = setup
    batch = make_batch(samples, None)
    with torch.no_grad():
        seconds = head.logits(unroll(head, batch, 1)[0]).topk(2, dim=-1).indices[..., 1]  # [B, L]
    rigged = _with_depth1_labels(samples, seconds)
    assert topk_hits(head, rigged, (1, 2, 3)) == [0.0, 1.0, 1.0]
    hits = topk_hits(head, samples, (1, 4, model.config.vocab_size))
    assert hits[0] == acceptance(head, samples, 1)[0] and hits[0] <= hits[1] and hits[2] == 1.0


def test_loss_trains_every_depth(setup):
    """Labels that are a function of the token each depth is fed: learnable at every depth."""
    model, _, samples = setup
    vocab = model.config.vocab_size
    learnable = []
    for s in samples:
        s = dict(s, greedy=s["greedy"].clone(), top_ids=s["top_ids"].clone())
        target = (s["tokens"][:-1] * 7 + 3) % vocab  # greedy[j] = f(x_j)
        s["greedy"] = torch.where(s["greedy"] >= 0, target, -1)
        s["top_ids"][:, 0] = target
        s["top_p"] = torch.tensor([1.0, 0, 0, 0]).expand(s["top_p"].shape)
        learnable.append(s)
    torch.manual_seed(2)
    head = EagleHead(model).train()
    batch = make_batch(learnable, None)
    scale = torch.ones(model.config.hidden_size)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        value, info = loss(head, batch, scale, Recipe(depth=3, distill=0.5, noise=0.0, feature_weight=0.0))
        first = float(value.detach()) if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    # (the tiny target's LM head has small weights: its softmax cannot peak, the loss floors high)
    assert float(value.detach()) < first - 1 and info["acc"] > 0.9
    head.eval()
    assert min(acceptance(head, learnable, 3)) > 0.9  # the unrolled depths learned too


def test_training_prompts_are_varied_and_keep_the_held_out_subjects_out():
    from decodekit.suites import SUITES, load_suite

    held_out = {r["prompt"] for name in SUITES for r in load_suite(name)}
    prompts = training_prompts(1200, seed=0)
    assert len(set(prompts)) == 1200 and not held_out & set(prompts)
    assert not any(mentions_held_out(p) for p in prompts)
    kinds = [kind_of(p) for p in prompts]
    assert set(kinds) == set(KINDS) - {"passage"} and min(kinds.count(k) for k in set(kinds)) >= 90
    assert prompts == training_prompts(1200, seed=0) != training_prompts(1200, seed=1)
    assert set(training_prompts(50, 0, kinds=("code",))) <= {p for p in prompts if kind_of(p) == "code"} | set(
        training_prompts(None, 0, kinds=("code",)))
    with pytest.raises(DecodeKitError, match="kinds must be among"):
        training_prompts(5, 0, kinds=("passage",))
    for word in ("sky", "cats", "water cycle", "interview"):
        assert word in HELD_OUT_WORDS and mentions_held_out(f"Tell me about the {word}.")


def test_passage_prompts_quote_an_answer_and_skip_short_or_held_out_ones():
    rng = random.Random(0)
    words = [rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(200)]
    long_text = " ".join(words[:60]) + ". " + " ".join(words[60:])
    prompts = passage_prompts([long_text, "too short.", long_text + " The sky is blue."], seed=0)
    assert len(prompts) == 1 and kind_of(prompts[0]) == "passage"
    assert " ".join(words[:30]) in prompts[0] and len(prompts[0].split()) < 110
