"""Hybrid drafting (``drafter="X+prompt_lookup"``): prompt lookup where a row's text repeats,
drafter X elsewhere; lossless, both sources used, X kept in sync with every row."""

from __future__ import annotations

import pytest

from decodekit import DecodeKitError, generate
from decodekit.strategies.hybrid import HybridDrafter, split_hybrid
from decodekit.strategies.speculative import ModelDrafter, early_exit_model

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

# repeats to copy from, open text, a 1-token prompt: ragged matches and acceptance
ROWS = [[5, 6, 7, 8, 9, 5, 6, 7], [10, 11, 12], [12, 13, 14, 15, 12, 13, 14, 15, 12, 13], [20]]


def _greedy(model, rows, n=24):
    return generate(model, rows, strategy="greedy", max_new_tokens=n, eos_token_id=[]).sequences


def _hybrid(model, rows, drafter, n=24, **kw):
    return generate(model, rows, strategy="speculative", drafter=drafter, max_new_tokens=n, eos_token_id=[], **kw)


@pytest.mark.parametrize("policy", ["fixed", "cost", "adaptive"])
def test_hybrid_greedy_is_greedy_at_batch_1_and_4(llama, policy):
    for rows in (ROWS[:1], ROWS[2:3], ROWS):
        out = _hybrid(llama, rows, "layers:1+prompt_lookup", gamma=3, draft_policy=policy)
        assert out.sequences == _greedy(llama, rows), (policy, len(rows))


class _Watched(HybridDrafter):
    """Before every proposal, checks that the primary's cache holds exactly the start of each
    row's history (its own rejected drafts, and drafts it made for rows that copied from the
    prompt instead, rolled back); counts the rows each source drafted for."""

    def __init__(self, primary):
        super().__init__(primary)
        self.primary_rows = self.lookup_rows = 0
        self.ragged = False

    def propose(self, rows, k):
        state = self.primary.state
        for b, history in enumerate(rows):
            held = state.ids[b][state.mask[b].bool()].tolist()
            assert held == history[: len(held)] and len(held) == self.primary.seen[b], "out of sync"
        found = self.matches(rows, k)
        self.lookup_rows += sum(f is not None for f in found)
        self.primary_rows += sum(f is None for f in found)
        return super().propose(rows, k)

    def update(self, draft, result, p):
        self.ragged |= len(set(result.accepted.tolist())) > 1
        super().update(draft, result, p)


def test_hybrid_uses_both_sources_and_keeps_the_primary_in_sync():
    target = tiny_llama(3, layers=3)
    for rows in (ROWS[2:3], ROWS):
        drafter = _Watched(ModelDrafter(early_exit_model(target, 2)))
        out = _hybrid(target, rows, drafter, n=30, gamma=4, draft_policy="fixed")
        assert out.sequences == _greedy(target, rows, n=30)
        assert drafter.sources["prompt_lookup"] > 0 and drafter.sources["model"] > 0, drafter.sources
        assert drafter.primary_rows > 0 and drafter.lookup_rows > 0
        assert sum(s.accepted for s in out.stats) > 0
        assert sum(s.drafter_forwards for s in out.stats) > 0  # the primary's forwards are counted
    assert drafter.ragged  # batch of 4: rows accepted different numbers of drafts


def test_hybrid_with_a_cheap_wrong_drafter_and_sampling(llama):
    other = early_exit_model(llama, 1)
    drafter = HybridDrafter(ModelDrafter(other))
    out = _hybrid(llama, ROWS, drafter, gamma=3, draft_policy="fixed", temperature=0.8, seed=3)
    again = _hybrid(llama, ROWS, HybridDrafter(ModelDrafter(other)), gamma=3, draft_policy="fixed",
                    temperature=0.8, seed=3)
    assert out.sequences == again.sequences and all(len(s) == 24 for s in out.sequences)
    assert drafter.sources["model"] > 0


def test_hybrid_spec_parsing(llama):
    assert split_hybrid("eagle+prompt_lookup") == ("eagle", True)
    assert split_hybrid("layers:8") == ("layers:8", False)
    with pytest.raises(DecodeKitError, match="X\\+prompt_lookup"):
        _hybrid(llama, ROWS[:1], "+prompt_lookup", n=2)


def test_cli_checks_the_hybrid_drafter_before_loading(capsys, monkeypatch):
    from decodekit import cli, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    argv = ["generate", "--prompt", "hi", "--strategy", "speculative", "--max_new_tokens", "2"]
    assert cli.main(argv + ["--drafter", "no/such/dir+prompt_lookup"]) == 2
    err = capsys.readouterr().err
    assert "drafter" in err and "no/such/dir" in err and "+prompt_lookup" not in err
