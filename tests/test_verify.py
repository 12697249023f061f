"""The shared rejection sampler reproduces the target distribution (vLLM-style statistical
tests: many independent rows at once, fixed seeds, total-variation bounds)."""

from __future__ import annotations

import torch

from decodekit import max_fn
from decodekit.strategies.verify import verify

V = 8
N = 200_000  # rows = independent samples
TV_BOUND = 0.015  # E[TV] of an empirical distribution of N samples over V values is ~0.003


def _dist(seed: int, sharp: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, generator=g) * sharp, -1)


def _tv(samples: torch.Tensor, p: torch.Tensor) -> float:
    freq = torch.bincount(samples, minlength=V).float() / samples.numel()
    return 0.5 * float((freq - p).abs().sum())


def _emitted(draft: torch.Tensor, res, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token emitted at ``position`` by each row that emitted that many tokens, and which rows."""
    rows = res.accepted >= position  # rows that got as far as this position
    tok = torch.where(res.accepted > position, draft[:, min(position, draft.shape[1] - 1)], res.next_tokens)
    return tok[rows], rows


def _run(p_list, q_list, k, seed=0, **kw):
    """Draft k tokens per row from q (context-independent), verify against p."""
    g = torch.Generator().manual_seed(seed)
    p = torch.stack(p_list)[None].expand(N, k + 1, V)
    q = torch.stack(q_list)[None].expand(N, k, V) if q_list is not None else None
    src = torch.stack(q_list) if q_list is not None else torch.full((k, V), 1.0 / V)
    draft = torch.stack([torch.multinomial(src[i], N, replacement=True, generator=g) for i in range(k)], 1)
    drafted = torch.full((N,), k)
    res = verify(p, draft, drafted, q, generator=g, **kw)
    return draft, res


def test_rejection_sampling_reproduces_target_distribution():
    ps = [_dist(1), _dist(2), _dist(3)]
    qs = [_dist(11), _dist(12)]
    draft, res = _run(ps, qs, k=2)
    for pos in range(3):
        tok, rows = _emitted(draft, res, pos)
        assert rows.sum() > 10_000
        assert _tv(tok, ps[pos]) < TV_BOUND, pos
    assert 0 < res.accepted.float().mean() < 2  # both accepts and rejections happened


def test_deterministic_drafts_q_none_reproduce_target():
    ps = [_dist(4, 2.0), _dist(5, 2.0)]
    draft, res = _run(ps, None, k=1)  # drafts uniform but treated as deterministic (q = one-hot)
    for pos in range(2):
        tok, _ = _emitted(draft, res, pos)
        assert _tv(tok, ps[pos]) < TV_BOUND


def test_deterministic_draft_accepted_with_probability_p():
    p = _dist(6)
    x = int(p.argmax())
    res = verify(p[None, None].expand(N, 2, V), torch.full((N, 1), x), torch.ones(N, dtype=torch.long),
                 generator=torch.Generator().manual_seed(0))
    assert abs(res.accepted.float().mean().item() - p[x].item()) < 0.01
    rejected = res.accepted == 0
    assert not (res.next_tokens[rejected] == x).any()  # x removed from the residual


def test_skip_sample_adjustment_is_detectably_lossy():
    # q puts much mass where p does too: resampling from p after a rejection over-weights it.
    p = torch.tensor([0.5, 0.3, 0.1, 0.1, 0, 0, 0, 0])
    q = torch.tensor([0.1, 0.1, 0.1, 0.7, 0, 0, 0, 0])
    draft, exact = _run([p, p], [q], k=1)
    assert _tv(_emitted(draft, exact, 0)[0], p) < TV_BOUND
    draft, lossy = _run([p, p], [q], k=1, skip_sample_adjustment=True)
    assert _tv(_emitted(draft, lossy, 0)[0], p) > 0.05


def test_p_equal_q_accepts_everything_and_no_nan():
    p = _dist(7)
    draft, res = _run([p, p, p], [p, p], k=2)
    assert bool((res.accepted == 2).all())
    probs = max_fn(p - p)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(), torch.tensor(1.0))


def test_zero_residual_uses_fallback():
    p = torch.tensor([[0.2, 0.8]])
    assert torch.equal(max_fn(p - p, fallback=p), p)
    assert torch.allclose(max_fn(torch.tensor([[0.5, -0.5]])), torch.tensor([[1.0, 0.0]]))


def test_zero_drafted_rows_sample_from_p():
    p = _dist(8)
    g = torch.Generator().manual_seed(1)
    res = verify(p[None, None].expand(N, 3, V), torch.zeros(N, 2, dtype=torch.long),
                 torch.zeros(N, dtype=torch.long), p[None, None].expand(N, 2, V), generator=g)
    assert bool((res.accepted == 0).all())
    assert _tv(res.next_tokens, p) < TV_BOUND
    empty = verify(p[None, None].expand(4, 1, V), torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert empty.accepted.tolist() == [0, 0, 0, 0]


def test_greedy_accepts_exactly_the_argmax_prefix():
    logits = torch.randn(3, 4, V, generator=torch.Generator().manual_seed(2))
    p = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    best = logits.argmax(-1)  # [3, 4]
    draft = best[:, :3].clone()
    draft[1, 1] = (draft[1, 1] + 1) % V  # row 1 wrong at position 1
    draft[2, 0] = (draft[2, 0] + 1) % V  # row 2 wrong at position 0
    res = verify(p, draft, torch.tensor([3, 3, 2]), greedy=True)
    assert res.accepted.tolist() == [3, 1, 0]
    assert res.next_tokens.tolist() == [best[0, 3].item(), best[1, 1].item(), best[2, 0].item()]


def test_ragged_drafted_per_row():
    p = _dist(9)
    pp = p[None, None].expand(2, 3, V)
    draft = torch.full((2, 2), int(p.argmax()))
    res = verify(pp, draft, torch.tensor([2, 1]), pp[:, :2], generator=torch.Generator().manual_seed(0))
    assert res.accepted.tolist() == [2, 1]  # p == q: every real draft accepted, never beyond drafted
