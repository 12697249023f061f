"""Draft-length policies: fixed, EGAG (SPEC §5 formula, EMA), cost-aware (expected tokens/s)."""

from __future__ import annotations

import math

import pytest
import torch

from decodekit import DecodeKitError, costs, generate
from decodekit.strategies import draft_policy as dp
from decodekit.strategies.draft_policy import (
    CostCurve,
    CostPolicy,
    EgagPolicy,
    egag_gamma,
    expected_tokens,
    forward_cost_curve,
    make_policy,
)
from decodekit.strategies.speculative import Drafter

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_egag_formula_matches_spec():
    V = 50
    logits = torch.stack([torch.zeros(V), torch.tensor([40.0] + [0.0] * (V - 1)), torch.randn(V)])
    g = egag_gamma(logits, temperature=1.0, gamma_min=1, gamma_max=8)
    for row, got in zip(logits, g.tolist()):
        p = torch.softmax(row, -1)
        h = -(p * torch.log(p + 1e-8)).sum()
        want = min(max(int((1 - h / math.log(V)) * 8), 1), 8)
        assert got == want
    assert g[0] == 1 and g[1] == 8  # uniform -> gamma_min, confident -> gamma_max


class _Logits:
    """Stand-in drafter returning fixed first-position logits."""

    name = "stub"

    def __init__(self, seq):
        self.seq, self.calls = list(seq), 0

    def first_logits(self, rows):
        out = self.seq[self.calls]
        self.calls += 1
        return out


class _Req:
    class processor:  # noqa: N801 - mimics an attribute
        temperature = 1.0


def test_egag_ema_per_row():
    V = 10
    confident = torch.tensor([[30.0] + [0.0] * (V - 1)])  # g = gamma_max = 8
    uniform = torch.zeros(1, V)  # g = gamma_min = 1
    policy = EgagPolicy(gamma_min=1, gamma_max=8, beta=0.5)
    policy.start(_Req(), _Logits([confident, uniform, uniform]))
    assert policy.choose([[1]]).tolist() == [8]  # ema = g on the first step
    assert policy.choose([[1]]).tolist() == [round(0.5 * 8 + 0.5 * 1)]  # 4.5 -> 4 (round half even)
    assert policy.choose([[1]]).tolist() == [round(0.5 * 4.5 + 0.5 * 1)]
    no_ema = EgagPolicy(1, 8, 0.0)
    no_ema.start(_Req(), _Logits([torch.cat([confident, uniform])]))
    assert no_ema.choose([[1], [2]]).tolist() == [8, 1]


def test_expected_tokens():
    assert expected_tokens(0, 0.5) == 1.0
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(4, 1.0) == 5.0


def _policy_with_curve(points: dict[int, float], gmax=8, draft_cost=0.0):
    policy = CostPolicy(1, gmax)
    curve = CostCurve()
    curve.points.update(points)
    policy.cost = lambda n, batch: curve(n * batch)  # t(n, B) as B * n tokens of one row

    class D(Drafter):
        def step_cost(self, batch):
            return draft_cost

    policy.drafter = D()
    return policy


def test_cost_policy_drafts_long_when_cheap_and_accepted():
    flat = {n: 0.01 for n in range(1, 40)}  # verifying more tokens costs nothing extra
    policy = _policy_with_curve(flat)
    policy.accepted, policy.rejected = 88.0, 7.0  # a = 0.9 with the prior
    assert policy.choose([[1]]).tolist() == [8]


def test_cost_policy_drafts_short_when_verification_is_expensive_or_rejected():
    linear = _policy_with_curve({1: 0.01, 40: 0.40})  # pure compute bound: t(n) = n * t(1)
    linear.accepted, linear.rejected = 28.0, 7.0  # a = 0.79
    assert linear.choose([[1]]).tolist() == [0]  # E(k, a) < k + 1: speculation never pays
    affine = _policy_with_curve({1: 0.01, 40: 0.10})  # fixed cost + a smaller one per token
    affine.accepted, affine.rejected = 0.0, 17.0  # a = 0.1 with the prior
    assert affine.choose([[1]]).tolist() == [0]  # plain decoding beats speculation
    affine.accepted, affine.rejected = 28.0, 7.0  # a = 0.79
    assert 1 <= affine.choose([[1]]).item() < 8  # worth drafting, but not as long as allowed
    # observe() moves the estimate: all-accepted steps raise a
    flat = _policy_with_curve({n: 0.01 for n in range(1, 40)}, draft_cost=0.001)
    for _ in range(30):
        flat.observe(torch.tensor([4]), torch.tensor([4]))
    assert flat.acceptance > 0.95 and flat.choose([[1]]).item() == 8
    for _ in range(60):
        flat.observe(torch.tensor([4]), torch.tensor([0]))
    assert flat.acceptance < 0.2 and flat.choose([[1]]).item() < 8
    for _ in range(700):  # no drafting for a long while: back to the prior, probe again
        flat.observe(torch.tensor([0]), torch.tensor([0]))
    assert flat.acceptance == pytest.approx(2 / 3, abs=0.01)


def test_cost_policy_probes_a_failing_drafter_rarely():
    """Each probe costs a multi-token forward plus the drafter's steps: a drafter whose drafts
    are always rejected is tried again about every 100 steps (measured with the EAGLE head on
    the bundled model: probing every ~15 steps cost ~10% against greedy)."""
    policy = _policy_with_curve({1: 0.068, 2: 0.117, 40: 0.20}, gmax=5, draft_cost=0.005)  # measured, b1
    probes = []
    for step in range(600):
        k = policy.choose([[1]]).item()
        if k:
            probes.append(step)
        policy.observe(torch.tensor([k]), torch.tensor([0]))
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes and probes[0] == 0  # the prior (a = 2/3) tries drafting at first
    assert len(probes) >= 3 and min(gaps[2:]) >= 60


def test_cost_curve_interpolates_and_extrapolates():
    c = CostCurve()
    c.points.update({1: 1.0, 3: 3.0})
    assert c(2) == pytest.approx(2.0) and c(5) == pytest.approx(5.0) and c(1) == 1.0


@pytest.mark.measured_costs
def test_forward_cost_curve_is_measured_once(monkeypatch):
    model = tiny_llama(7, layers=1)
    curve = forward_cost_curve(model, 6, repeats=1)
    assert set(curve.points) >= {1, 2, 3, 4, 5, 6} and all(t > 0 for t in curve.points.values())
    calls = []
    monkeypatch.setattr(costs.time, "perf_counter", lambda: calls.append(1) or 0.0)
    assert forward_cost_curve(model, 6) is curve and not calls  # cached: nothing re-measured


def test_cost_policy_end_to_end_stays_in_range(llama):
    out = generate(llama, [[5, 6, 7]], strategy="speculative", drafter="layers:1", draft_policy="cost",
                   gamma_min=2, gamma_max=5, max_new_tokens=20, eos_token_id=[])
    assert all(n == 0 or 2 <= n <= 5 for n in out.stats[0].draft_lengths)
    egag = generate(llama, [[5, 6, 7]], strategy="speculative", drafter="layers:1", draft_policy="egag",
                    gamma_min=2, gamma_max=5, max_new_tokens=20, eos_token_id=[])
    assert all(2 <= n <= 5 for n in egag.stats[0].draft_lengths)
    assert egag.stats[0].drafter_forwards == sum(egag.stats[0].draft_lengths)  # EGAG forward reused


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="nope"), "draft_policy"),
        (dict(gamma=0), "gamma"),
        (dict(gamma_min=0), "gamma_min"),
        (dict(gamma=3, gamma_min=4), "gamma_min"),
        (dict(gamma_min=3, gamma_max=2), "gamma_min"),
        (dict(egag_ema_beta=1.0), "egag_ema_beta"),
        (dict(egag_ema_beta=float("nan")), "egag_ema_beta"),
    ],
)
def test_make_policy_rejects_bad_options(kwargs, message):
    with pytest.raises(DecodeKitError, match=message):
        make_policy(**kwargs)


def test_make_policy_kinds():
    assert make_policy("fixed", gamma=4).choose([[1], [2]]).tolist() == [4, 4]
    assert isinstance(make_policy("egag", gamma=4, gamma_max=9), EgagPolicy)
    assert make_policy("cost", gamma=4).gamma_max == 4


# ---------------------------------------------------------------------------- one interface, every drafter
@pytest.mark.parametrize("options", [dict(gamma=129), dict(gamma=4, gamma_max=129), dict(gamma=-1)])
def test_gamma_out_of_range_is_an_error_before_any_forward(llama, options):
    calls = []
    hook = llama.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(DecodeKitError, match=r"gamma(_max)? must be >= 1 and <= 128"):
            make_policy("cost", **options)
        with pytest.raises(DecodeKitError, match=r"gamma(_max)? must be >= 1 and <= 128"):
            generate(llama, [[5, 6, 7]], strategy="speculative", drafter="layers:1", max_new_tokens=4, **options)
        if "gamma_max" not in options:
            with pytest.raises(DecodeKitError, match="gamma must be >= 1 and <= 128"):
                generate(llama, [[5, 6, 7]], strategy="prompt_lookup", max_new_tokens=4, **options)
    finally:
        hook.remove()
    assert not calls


def _request(model, rows, max_new_tokens):
    from decodekit.cache import left_pad
    from decodekit.outputs import RowTracker
    from decodekit.seed import GreedyProcessor
    from decodekit.strategies.base import DecodeRequest

    ids, mask = left_pad(rows, 0)
    tracker = RowTracker([len(r) for r in rows], max_new_tokens=max_new_tokens)
    return DecodeRequest(model, ids, mask, GreedyProcessor(), tracker, max_new_tokens)


def test_draft_length_is_capped_by_the_remaining_tokens(llama):
    from decodekit.strategies.speculative import ModelDrafter, speculative_loop

    rows = [[5, 6, 7], [8, 9]]
    want = generate(llama, rows, strategy="greedy", max_new_tokens=8, eos_token_id=[]).sequences
    # a policy asking 1000 drafts (beyond the validated range, built directly)
    out = speculative_loop(_request(llama, rows, 8), ModelDrafter(llama), dp.FixedPolicy(1000))
    assert out.sequences == want
    for s in out.stats:  # first token from the prefill: at most 7 tokens left to draft
        assert 0 < max(s.draft_lengths) <= 7 and s.drafter_forwards <= 8 * len(s.draft_lengths)
    for strategy, extra in [("speculative", dict(drafter=llama)), ("prompt_lookup", dict(draft_policy="fixed"))]:
        out = generate(llama, [[5, 6, 7, 5, 6, 7, 5, 6]], strategy=strategy, gamma=128, max_new_tokens=8,
                       eos_token_id=[], **extra)
        assert max(out.stats[0].draft_lengths) <= 7, strategy


def test_every_policy_with_every_drafter(llama):
    """One list of policy names: adaptive drafts for a draft model, cost for n-grams; egag
    needs a drafter with probabilities and says which policies fit the others."""
    rows = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 9, 10]]
    want = generate(llama, rows, strategy="greedy", max_new_tokens=12, eos_token_id=[]).sequences
    for strategy, extra in [("speculative", dict(drafter=llama)), ("ngram", {}), ("prompt_lookup", {})]:
        for policy in dp.POLICIES:
            if policy == "egag" and strategy != "speculative":
                with pytest.raises(DecodeKitError, match="draft_policy must be one of 'fixed', 'cost', 'adaptive'"):
                    generate(llama, rows, strategy=strategy, draft_policy=policy, max_new_tokens=4, **extra)
                continue
            out = generate(llama, rows, strategy=strategy, draft_policy=policy, gamma=3, max_new_tokens=12,
                           eos_token_id=[], **extra)
            assert out.sequences == want, (strategy, policy)
    adaptive = generate(llama, rows, strategy="speculative", drafter=llama, draft_policy="adaptive", gamma=3,
                        max_new_tokens=12, eos_token_id=[])
    assert all(s.accepted > 0 for s in adaptive.stats)  # drafter == target: the gate stays open


def test_cost_and_adaptive_share_one_acceptance_estimator():
    cost, adaptive = CostPolicy(1, 4), dp.AdaptivePolicy(4)
    adaptive.rows, adaptive.shadow, adaptive.levels = [{}], [None], [0]
    for _ in range(5):
        cost.observe(torch.tensor([3]), torch.tensor([1]))
        adaptive.observe(torch.tensor([3]), torch.tensor([1]))
    assert isinstance(cost.estimate, dp.Acceptance) and isinstance(adaptive.estimate(0, 0), dp.Acceptance)
    # one estimator, each policy with the constants it was measured with
    seen = sum(0.95**i for i in range(5))  # cost: decay 0.95, fixed prior 2 accepted / 1 rejected
    assert cost.acceptance == pytest.approx((seen + 2) / (2 * seen + 3))
    seen = sum(0.8**i for i in range(5))  # adaptive: decay 0.8, a forgetting prior 1 / 1
    assert adaptive.estimate(0, 0).rate == pytest.approx((seen + 0.8**5) / (2 * seen + 2 * 0.8**5))
    from decodekit import AcceptanceGate

    assert AcceptanceGate is dp.AdaptivePolicy


def test_cost_curves_of_a_quantized_model_are_its_own():
    from decodekit.quant import quantize_model

    model, twin = tiny_llama(), tiny_llama()
    twin.config._name_or_path = model.config._name_or_path = "same-name"
    quantize_model(twin, "int8")
    assert costs.model_key(model) != costs.model_key(twin)


def test_cost_policy_keeps_its_estimate_with_the_drafter():
    """A drafter with ``memory`` (kept with its weights: the EAGLE head, a draft model) hands
    the acceptance estimate of one generate call to the next; others start from the prior."""
    from types import SimpleNamespace

    class D(Drafter):
        name = "d"

        def __init__(self, memory):
            self.memory = memory

        def step_cost(self, batch):
            return 0.0

    req = SimpleNamespace(max_new_tokens=16, model=None)
    shared = D({})
    first = CostPolicy(1, 4)
    first.start(req, shared)
    for _ in range(10):
        first.observe(torch.tensor([4]), torch.tensor([0]))
    assert first.acceptance < 0.2
    second = CostPolicy(1, 4)
    second.start(req, D(shared.memory))  # a new drafter object on the same weights
    assert second.acceptance == first.acceptance
    fresh = CostPolicy(1, 4)
    fresh.start(req, D(None))
    assert fresh.acceptance == pytest.approx(2 / 3)


def test_cost_policy_weighs_one_levels_drafts_against_the_whole_batch():
    """Three rows the primary drafts for (rejected) and one copying row (accepted): the copying
    row's drafts widen every row's verify forward, which costs more than that row gains on a
    steep curve; the same row alone drafts."""
    policy = _policy_with_curve({1: 0.11, 40: 0.50}, gmax=5, draft_cost=0.005)  # t(n, B) = 0.1 + 0.01 n B

    class Hybrid(Drafter):
        name = "h"

        def levels(self, rows):
            return [int(r == [9]) for r in rows]

        def level_cost(self, level, batch):
            return 0.0 if level else 0.005

    policy.drafter = Hybrid()
    policy.level(0).add(0.0, 50.0)  # a ~ 0.04
    policy.level(1).add(95.0, 5.0)  # a ~ 0.94
    assert policy.choose([[1], [2], [3], [9]]).tolist() == [0, 0, 0, 0]
    assert policy.choose([[9]]).tolist() == [5]


def test_cost_policy_charges_a_drafters_setup_to_drafting():
    """A drafter that must first catch up (EAGLE after a stretch of copies) costs more to start
    than its steps: drafts that pay at step cost alone lose with the setup counted."""
    policy = _policy_with_curve({1: 0.030, 2: 0.034, 40: 0.20}, gmax=5, draft_cost=0.002)

    class CatchingUp(Drafter):
        setup = 0.0

        def step_cost(self, batch):
            return 0.002

        def setup_cost(self, level, batch):
            return self.setup

    policy.drafter = CatchingUp()
    policy.accepted, policy.rejected = 3.0, 7.0  # a = 0.38 with the prior
    assert policy.choose([[1]]).item() >= 1
    policy.drafter.setup = 0.020  # feeding many pending pairs: 2/3 of a target forward
    assert policy.choose([[1]]).tolist() == [0]


def test_cost_policy_keeps_one_estimate_per_level():
    """The hybrid says before drafting which rows would copy a lookup match (level 1) and which
    the primary would draft for (level 0): a failing primary must not stop the lookup rows."""
    policy = _policy_with_curve({1: 0.068, 2: 0.117, 40: 0.20}, gmax=5, draft_cost=0.005)

    class Hybrid(Drafter):
        name = "h"
        copying = [False, True]

        def levels(self, rows):
            return [int(c) for c in self.copying]

        def level_cost(self, level, batch):
            return 0.0 if level else 0.005

    policy.drafter = Hybrid()
    for _ in range(20):  # the primary's drafts always fail, the copies always pass
        budget = policy.choose([[1], [2]])
        policy.observe(budget, torch.where(torch.tensor([False, True]), budget, 0))
    assert policy.level(0).rate < 0.3 and policy.level(1).rate > 0.9  # the primary stops drafting near 0.25
    budget = policy.choose([[1], [2]]).tolist()
    assert budget[0] <= 1 and budget[1] == 5
