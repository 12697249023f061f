import math

import pytest
import torch

from decodekit import (
    GreedyProcessor,
    MultinomialProcessor,
    NucleusProcessor,
    TopKNucleusProcessor,
    TopKProcessor,
    make_processor,
    top_k_filtering,
    top_p_filtering,
)
from decodekit.validation import DecodeKitError


def expected_dist(logits, temperature, top_k=None, top_p=None):
    """Reference: temperature, then top-k, then top-p, written independently with sorting."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    keep = order[: top_k or len(order)]
    if top_p is not None:
        sub = probs[keep] / probs[keep].sum()
        kept, mass = [], 0.0
        for tok, pr in zip(keep, sub.tolist()):
            kept.append(tok)
            mass += pr
            if mass >= top_p:
                break
        keep = kept
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def test_greedy_is_one_hot_and_batched():
    logits = torch.randn(3, 5, 11)
    probs = GreedyProcessor()(logits)
    assert probs.shape == logits.shape
    assert torch.equal(probs.sum(-1), torch.ones(3, 5))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(GreedyProcessor().sample(probs), logits.argmax(-1))


@pytest.mark.parametrize(
    "proc",
    [GreedyProcessor(), MultinomialProcessor(0.7), TopKProcessor(0.7, 3), NucleusProcessor(0.7, 0.8),
     TopKNucleusProcessor(0.7, 4, 0.8)],
)
def test_processors_do_not_modify_input(proc):
    logits = torch.randn(2, 13)
    before = logits.clone()
    probs = proc(logits)
    assert torch.equal(logits, before)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert proc.sample(probs).shape == (2,)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, None), (0.5, None, 0.7), (2.0, 5, 0.6), (0.8, None, None)])
def test_processor_distribution_matches_reference(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(17) * 2
    proc = make_processor(temperature, top_k, top_p)
    got = proc(logits[None])[0].double()
    assert torch.allclose(got, expected_dist(logits, temperature, top_k, top_p), atol=1e-6)


def test_temperature_applied_before_top_p():
    # Two tokens with p = 0.6 / 0.4 at T=1. top_p=0.55 keeps only the first at T=1, but at
    # T=10 the distribution is ~0.51 / 0.49 and the first alone still reaches 0.55? no:
    # 0.51 < 0.55, so both are kept. The original (top-p first) would keep one.
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    assert (NucleusProcessor(1.0, 0.55)(logits) > 0).sum() == 1
    assert (NucleusProcessor(10.0, 0.55)(logits) > 0).sum() == 2


def test_top_p_filtering_keeps_min_tokens_and_is_pure():
    logits = torch.tensor([[5.0, 0.0, -1.0, -2.0]])
    before = logits.clone()
    out = top_p_filtering(logits, top_p=0.1, min_tokens_to_keep=2)
    assert torch.equal(logits, before)
    assert torch.isfinite(out).sum() == 2
    assert torch.isfinite(top_k_filtering(logits, 3)).sum() == 3


def test_sampling_frequencies_match_distribution():
    """Chi-square test of many draws against the processor's own target distribution."""
    torch.manual_seed(1)
    logits = torch.randn(12)
    proc = TopKNucleusProcessor(0.9, top_k=6, top_p=0.85)
    expected = expected_dist(logits, 0.9, 6, 0.85)
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    draws = proc.sample(proc(logits.expand(n, -1)), generator=gen)
    counts = torch.bincount(draws, minlength=12).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # never outside the filtered set
    exp_counts = expected[support] * n
    chi2 = (((counts[support] - exp_counts) ** 2) / exp_counts).sum().item()
    dof = int(support.sum()) - 1
    # 99.9th percentile of chi2 with <= 6 dof is < 23
    assert chi2 < 23, (chi2, dof)
    assert math.isclose(counts.sum().item(), n)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(temperature=-1), "temperature"), (dict(temperature=1, top_p=0), "top_p"),
     (dict(temperature=1, top_p=1.5), "top_p"), (dict(temperature=1, top_k=0), "top_k")],
)
def test_bad_knobs_name_the_parameter(kwargs, match):
    with pytest.raises(DecodeKitError, match=match):
        make_processor(**kwargs)


def test_make_processor_temperature_zero_is_greedy():
    assert isinstance(make_processor(0), GreedyProcessor)
    assert isinstance(make_processor(None, top_k=5), GreedyProcessor)
    assert isinstance(make_processor(0.7, top_k=5), TopKProcessor)
