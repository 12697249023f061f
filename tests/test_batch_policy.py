"""Batch-aware draft policies: the verify cost t(n, B) is measured per batch size, and the
cost / adaptive policies compare drafting against plain greedy at the batch size in use."""

from __future__ import annotations

import pytest
import torch

from decodekit import costs, generate, ngram_assisted_speculative_generate, speculative_generate
from decodekit.ngram_storage import NGramStorage
from decodekit.strategies import ngram, speculative
from decodekit.strategies.draft_policy import (
    AdaptivePolicy,
    CostCurve,
    CostPolicy,
    VerifyCost,
    batch_bucket,
    forward_cost_curve,
)
from decodekit.strategies.speculative import Draft, Drafter

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _inject(model, batch: int, seconds, top: int = 64) -> None:
    """A synthetic curve for ``model`` at ``batch`` rows: ``seconds(n)`` for n = 1..top."""
    curve = CostCurve()
    curve.points.update({n: seconds(n) for n in range(1, top + 1)})
    costs.CURVES[(costs.model_key(model), batch)] = curve


class _Req:
    def __init__(self, model, batch: int, max_new_tokens: int = 32):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.input_ids = torch.zeros(batch, 3, dtype=torch.long)


class _Drafter(Drafter):
    name = "stub"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def step_cost(self, batch: int) -> float:
        return self.seconds


FLAT = staticmethod(lambda n: 0.010 + 0.0001 * n)  # reading the weights dominates
COMPUTE = staticmethod(lambda n: 0.010 * n)  # every token costs a full forward's time
MILD = staticmethod(lambda n: 0.010 + 0.001 * n)  # each token adds 10%


@pytest.mark.measured_costs
def test_curves_are_measured_and_cached_per_batch_size():
    model = tiny_llama(21, layers=1)
    shapes = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    try:
        four = forward_cost_curve(model, 4, batch=4, repeats=1)
    finally:
        hook.remove()
    assert set(shapes) == {4}  # measured with 4 rows
    assert (costs.model_key(model), 4) in costs.CURVES and (costs.model_key(model), 1) not in costs.CURVES
    assert forward_cost_curve(model, 4, batch=4) is four  # cached
    assert forward_cost_curve(model, 4, batch=1, repeats=1) is not four
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    cost = VerifyCost(model, 4)
    assert cost(2, 3) == pytest.approx(four(2 * 3 / 4))  # 3 rows: the 4-row bucket, 6 tokens
    assert cost(2, 4) == four(2)


def test_curve_points_never_decrease_with_the_tokens():
    c = CostCurve()
    c.points.update({1: 0.05, 2: 0.01, 3: 0.02, 4: 0.03})  # a load spike while timing n = 1
    costs.monotone(c)
    assert c.as_dict() == {1: 0.01, 2: 0.01, 3: 0.02, 4: 0.03}


def test_cost_policy_picks_greedy_where_the_batch_makes_drafting_lose():
    model = tiny_llama(22, layers=1)
    _inject(model, 1, FLAT)
    _inject(model, 4, COMPUTE)  # 4 rows: verification costs compute
    policy = CostPolicy(1, 5)
    policy.start(_Req(model, 4), _Drafter(0.0))
    policy.accepted, policy.rejected = 28.0, 7.0  # a = 0.79
    assert policy.choose([[1]]).item() > 0  # one row: drafting pays
    assert policy.choose([[1]] * 4).tolist() == [0] * 4  # four rows: plain greedy


def test_cost_policy_drafts_nothing_when_the_drafter_costs_too_much():
    model = tiny_llama(23, layers=1)
    _inject(model, 1, FLAT)
    cheap, dear = CostPolicy(1, 5), CostPolicy(1, 5)
    cheap.start(_Req(model, 1), _Drafter(0.0005))
    dear.start(_Req(model, 1), _Drafter(0.02))  # a draft step costs two target forwards
    for policy in (cheap, dear):
        policy.accepted, policy.rejected = 28.0, 7.0
    assert cheap.choose([[1]]).item() == 5
    assert dear.choose([[1]]).item() == 0


def _adaptive(model, batch: int) -> AdaptivePolicy:
    policy = AdaptivePolicy(4)
    policy.start(_Req(model, batch), None)
    return policy


def test_adaptive_picks_one_width_for_the_batch():
    model = tiny_llama(24, layers=1)
    _inject(model, 1, FLAT)
    _inject(model, 2, COMPUTE)
    draft = Draft(torch.tensor([[5, 6, 7, 8], [9, 9, 0, 0]]), torch.tensor([4, 2]), evidence=[3, 1])
    steep = _adaptive(model, 2)
    assert steep.trim(draft, [[1, 2], [3, 4]]).drafted.tolist() == [0, 0]  # 2 rows, compute bound
    assert steep.shadow[0] is not None  # the withheld first draft is still scored
    _inject(model, 2, MILD)
    flat = _adaptive(model, 2)
    for _ in range(5):
        flat.estimate(1, 1).add(0, 1)  # row 1's drafts keep failing
    assert flat.budget(1, 1, 2) == 0  # alone it would not draft...
    assert flat.budget(0, 3, 4) == 2  # row 0 alone: 2 drafts (a = 1/2)
    assert flat.trim(draft, [[1, 2], [3, 4]]).drafted.tolist() == [2, 2]  # row 1's are free in the width
    flat.select_rows(torch.tensor([1]))
    flat.trim(Draft(draft.tokens[1:], torch.tensor([2]), evidence=[1]), [[3, 4]])
    assert flat.cost_batch == 1 and flat.cost[:3] == pytest.approx([FLAT(1), FLAT(2), FLAT(3)])  # one row left


def test_default_policy_is_cost_in_generate_and_fixed_in_the_seed_functions(monkeypatch, llama):
    used = []

    def spy(loop):
        def run(req, drafter, policy, **kw):
            used.append(policy.name)
            return loop(req, drafter, policy, **kw)
        return run

    monkeypatch.setattr(speculative, "speculative_loop", spy(speculative.speculative_loop))
    monkeypatch.setattr(ngram, "speculative_loop", spy(ngram.speculative_loop))
    generate(llama, [[5, 6, 7]], strategy="speculative", drafter="layers:1", max_new_tokens=3)
    speculative_generate([5, 6, 7], "layers:1", llama, max_gen_len=3)
    ngram_assisted_speculative_generate([5, 6, 7], NGramStorage(3, llama.config.vocab_size), llama, max_gen_len=3)
    assert used == ["cost", "fixed", "fixed"]
