"""serve.mixed: per-row processors and drafters of a mixed lane equal each row's own."""

from __future__ import annotations

import torch

from decodekit.processors import make_pipeline
from decodekit.serve.mixed import RowDrafters, RowProcessors
from decodekit.strategies.ngram import PromptLookupDrafter
from decodekit.strategies.speculative import Draft, Drafter
from decodekit.strategies.verify import VerifyResult, verify

VOCAB = 50


def _pipelines():
    return [make_pipeline(), make_pipeline(temperature=0.7, top_p=0.9), make_pipeline(repetition_penalty=1.5),
            make_pipeline(), make_pipeline(temperature=1.3, repetition_penalty=1.2)]


def test_row_processors_equal_each_rows_own():
    """Scores and distributions, [B, V] and [B, K, V] with histories: row b as its own pipeline
    computes them alone (greedy rows one-hot, penalties on the row's own history)."""
    torch.manual_seed(0)
    procs = _pipelines()
    rows = RowProcessors(procs)
    assert rows.needs_history and not rows.is_greedy
    assert len(rows.groups()) == 4  # the two plain greedy rows are processed together
    ids = torch.randint(0, VOCAB, (5, 9))
    for logits in (torch.randn(5, VOCAB), torch.randn(5, 3, VOCAB)):
        scores = rows.process_logits(ids, logits, torch.full((5,), 4), torch.zeros(5, dtype=torch.long))
        dist = rows.distribution(scores)
        for b, proc in enumerate(procs):
            own = proc.process_logits(ids[b:b + 1], logits[b:b + 1], torch.tensor([4]), torch.tensor([0]))
            torch.testing.assert_close(scores[b:b + 1], own)
            torch.testing.assert_close(dist[b:b + 1], proc.distribution(own))
        assert torch.equal(dist[0].argmax(-1), logits[0].argmax(-1))  # greedy row: one-hot argmax
        assert float(dist[0].max()) == 1.0


def test_row_processors_follow_the_batch():
    procs = _pipelines()
    rows = RowProcessors(procs[:3])
    rows.add_rows(RowProcessors(procs[3:]))
    assert len(rows.groups()) == 4  # groups are kept between steps...
    rows.select_rows([0, 2, 4])
    assert rows.procs == [procs[0], procs[2], procs[4]]
    assert [r.tolist() for _, r in rows.groups()] == [[0], [1], [2]]  # ...and made anew when rows leave
    assert not RowProcessors([procs[0], procs[3]]).needs_history
    assert RowProcessors([procs[0], procs[3]]).is_greedy and RowProcessors([procs[0], procs[3]]).greedy_rows is True
    assert rows.greedy_rows.tolist() == [True, True, False]  # a penalty alone is greedy


def test_greedy_rows_verified_in_sampling_mode_stay_greedy():
    """A mixed lane verifies in sampling mode when one row samples: with a one-hot p the
    sampler accepts exactly the drafts equal to the argmax and emits the argmax."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        best = torch.randint(0, VOCAB, (6, 5), generator=gen)  # [B, k+1] the target's argmax
        p = torch.nn.functional.one_hot(best, VOCAB).float()
        drafts = torch.where(torch.rand(6, 4, generator=gen) < 0.7, best[:, :4],
                             torch.randint(0, VOCAB, (6, 4), generator=gen))
        drafted = torch.randint(0, 5, (6,), generator=gen)
        want = verify(p, drafts, drafted, greedy=True)
        got = verify(p, drafts, drafted, greedy=False, generator=gen)
        assert torch.equal(got.accepted, want.accepted) and torch.equal(got.next_tokens, want.next_tokens)


def test_verify_with_per_row_greedy_flags():
    """``verify(greedy=[B] flags)``: greedy rows give exactly the greedy verdict; sampled rows
    keep the rejection sampler's law (the first emitted token follows p), over 20k rows."""
    gen = torch.Generator().manual_seed(2)
    n, vocab = 20000, 5
    logits = torch.randn(n, 2, vocab, generator=gen)
    greedy = torch.arange(n) % 2 == 0  # [N] even rows greedy
    p = torch.where(greedy[:, None, None], torch.nn.functional.one_hot(logits.argmax(-1), vocab).float(),
                    torch.softmax(logits, -1))
    p[1::2] = torch.softmax(torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0]] * 2), -1)  # sampled rows: one law
    drafts = torch.randint(0, vocab, (n, 1), generator=gen)
    drafted = torch.ones(n, dtype=torch.long)
    got = verify(p, drafts, drafted, greedy=greedy, generator=gen)
    want = verify(p[greedy], drafts[greedy], drafted[greedy], greedy=True)
    assert torch.equal(got.accepted[greedy], want.accepted) and torch.equal(got.next_tokens[greedy], want.next_tokens)
    sampled = ~greedy
    first = torch.where(got.accepted[sampled] > 0, drafts[sampled, 0], got.next_tokens[sampled])
    freq = torch.bincount(first, minlength=vocab).float() / int(sampled.sum())
    assert float((freq - p[1, 0]).abs().sum()) / 2 < 0.02  # total variation (expected ~0.005)


class _Req:
    def __init__(self, prompts):
        self._prompts = prompts

    def prompt_rows(self):
        return self._prompts


def _lookup(prompts):
    drafter = PromptLookupDrafter(3)
    drafter.prefill(_Req(prompts))
    return drafter


def test_row_drafters_merge_split_and_follow_the_batch():
    """Rows of a plain (never drafting) drafter and of prompt lookup in one batch: each row's
    drafts are its own drafter's; rows leave and join; a kind with no rows left is dropped."""
    lookup_rows = [[5, 6, 7, 5, 6], [9, 9, 9, 9]]
    mixed = RowDrafters(("none",), Drafter(), 1)
    mixed.add_rows(RowDrafters(("lookup",), _lookup(lookup_rows), 2))
    histories = [[1, 2, 3], *lookup_rows]
    draft = mixed.propose(histories, 3)
    alone = _lookup(lookup_rows).propose(lookup_rows, 3)
    assert draft.drafted.tolist() == [0, *alone.drafted.tolist()]
    for b in (1, 2):
        n = int(alone.drafted[b - 1])
        assert draft.tokens[b, :n].tolist() == alone.tokens[b - 1, :n].tolist()
    assert draft.evidence[1:] == alone.evidence and draft.q is None
    result = VerifyResult(torch.tensor([0, 1, 0]), torch.tensor([4, 7, 1]))
    mixed.update(draft, result, torch.rand(3, draft.k + 1, VOCAB))
    mixed.select_rows(torch.tensor([1, 2]))
    assert mixed.kinds == [("lookup",), ("lookup",)] and list(mixed.subs) == [("lookup",)]
    mixed.select_rows(torch.tensor([1]))
    assert len(mixed.subs[("lookup",)].index) == 1
    assert mixed.propose([[9, 9, 9, 9, 9]], 2).tokens[0].tolist() == [9, 9]


def test_row_drafters_one_hot_q_for_deterministic_rows_next_to_a_model():
    class Probabilistic(Drafter):
        def propose(self, rows, k):
            q = torch.softmax(torch.randn(len(rows), k, VOCAB), -1)
            return Draft(q.argmax(-1), torch.full((len(rows),), k), q)

    mixed = RowDrafters(("model",), Probabilistic(), 1)
    mixed.add_rows(RowDrafters(("lookup",), _lookup([[3, 4, 3, 4]]), 1))
    draft = mixed.propose([[1, 2], [3, 4, 3, 4]], 2)
    assert draft.q.shape == (2, 2, VOCAB)
    assert torch.equal(draft.q[1].argmax(-1), draft.tokens[1]) and float(draft.q[1].max()) == 1.0
