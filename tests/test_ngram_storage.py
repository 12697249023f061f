"""Unit tests of the n-gram storages: backoff order, tie rule, update/initialize, reset."""

from __future__ import annotations

import random

import pytest
import torch

from decodekit import DecodeKitError, INgramStorage, NGramStorage, OneLevelNGramStorage
from decodekit.ngram_storage import update_many


def test_bigrams_are_stored_and_predict():
    s = NGramStorage(2, 10)
    s.initialize([1, 2, 1, 2, 1, 3])
    assert s.next_token([5, 1]) == (2, True)  # 1 -> 2 twice, 1 -> 3 once
    assert s.has_gram([1, 2]) and s.has_gram([1, 3]) and not s.has_gram([2, 3])


def test_backoff_prefers_the_longest_known_context():
    s = NGramStorage(4, 10)
    s.initialize([7, 1, 2, 5, 0, 1, 2, 6, 0, 1, 2, 6, 9, 8, 2, 4, 8, 2, 4])
    # order 4 (context 7 1 2) saw only 5, although 2 -> 4 and "1 2" -> 6 are more frequent
    assert s.next_token([7, 1, 2]) == (5, True)
    # unknown 3-token context: back off to order 3 ("1 2" -> 6 twice, -> 5 once)
    assert s.next_token([3, 1, 2]) == (6, True)
    # unknown 2-token context: back off to bigrams (2 -> 4 twice, 6 twice, 5 once; 4 most recent)
    assert s.next_token([3, 3, 2]) == (4, True)
    # nothing knows 3: fallback, known=False (most frequent token overall: 2)
    assert s.next_token([3, 3, 3]) == (2, False)


def test_short_context_and_empty_levels_do_not_raise():
    s = NGramStorage(5, 10)
    assert s.next_token([]) == (0, False)  # empty storage, empty context
    assert s.next_token([4]) == (0, False)
    assert not s.has_gram([4, 5])
    s.update([4], 5)
    assert s.next_token([1, 2, 3, 4]) == (5, True)  # only the bigram level has data
    assert s.has_gram([4, 5]) and not s.has_gram([3, 4, 5])


def test_tie_rule_most_frequent_then_most_recent():
    s = NGramStorage(3, 10)
    s.update([1, 2], [3])
    s.update([1, 2], [4])
    assert s.next_token([1, 2]) == (4, True)  # tie 1:1 -> the most recent
    s.update([1, 2], [3])
    assert s.next_token([1, 2]) == (3, True)  # 3 now more frequent
    s.update([1, 2], [4])
    assert s.next_token([1, 2]) == (4, True)  # tie 2:2 again -> most recent
    s.update([1, 2], [5])
    assert s.next_token([1, 2]) == (4, True)  # a newcomer with count 1 does not win


def test_has_gram_is_consistent_with_next_token():
    rng = random.Random(0)
    seq = [rng.randrange(6) for _ in range(200)]
    for storage in (NGramStorage(4, 6), OneLevelNGramStorage(3, 6)):
        storage.initialize(seq)
        for _ in range(300):
            ctx = [rng.randrange(6) for _ in range(rng.randrange(1, 5))]
            token, known = storage.next_token(ctx)
            if not known:
                continue
            grams = [ctx[len(ctx) - j :] + [token] for j in range(1, min(len(ctx), storage.n - 1) + 1)]
            assert any(storage.has_gram(g) for g in grams), (ctx, token)


def test_update_counts_every_order_and_initialize_matches_updates():
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    a, b = NGramStorage(3, 10), NGramStorage(3, 10)
    a.initialize(seq)
    for i in range(1, len(seq)):
        b.update(seq[:i], seq[i])
    assert len(a) == len(b) > 0
    for i in range(len(seq)):
        assert a.next_token(seq[:i]) == b.next_token(seq[:i])
    # every bigram and trigram of the sequence is known
    for i in range(1, len(seq)):
        assert a.has_gram(seq[i - 1 : i + 1])
    for i in range(2, len(seq)):
        assert a.has_gram(seq[i - 2 : i + 1])


def test_initialize_accepts_batches_and_tensors():
    a, b = NGramStorage(3, 10), NGramStorage(3, 10)
    a.initialize(torch.tensor([[1, 2, 3], [1, 2, 4]]))
    b.initialize([[1, 2, 3], [1, 2, 4]])
    assert a.next_token(torch.tensor([[1, 2]])) == b.next_token([1, 2]) == (4, True)
    a.update(torch.tensor([[1, 2]]), torch.tensor(3))
    assert a.next_token([1, 2]) == (3, True)


def test_reset_forgets_everything():
    s = NGramStorage(3, 10)
    s.initialize([1, 2, 3, 4])
    s.reset()
    assert len(s) == 0 and s.next_token([1, 2]) == (0, False) and not s.has_gram([1, 2, 3])


def test_one_level_storage_has_no_backoff():
    s = OneLevelNGramStorage(3, 10)
    s.initialize([1, 2, 3, 7, 2, 5])
    assert s.next_token([1, 2]) == (3, True)
    assert s.next_token([9, 2])[1] is False  # bigram 2 -> 3 exists, but no backoff
    assert s.next_token([2])[1] is False  # context too short
    assert s.has_gram([1, 2, 3]) and not s.has_gram([2, 3])
    s.reset()
    assert len(s) == 0


def test_draft_chains_predictions_and_stops_if_unknown():
    s = NGramStorage(3, 10)
    s.initialize([1, 2, 3, 4, 5])
    assert s.draft([1, 2], 3) == [3, 4, 5]
    assert s.draft([1, 2], 5, stop_if_unknown=True) == [3, 4, 5]
    assert len(s.draft([1, 2], 5)) == 5  # unknown contexts are filled with the fallback


def test_fillers_lose_ties_against_the_real_token():
    s = NGramStorage(2, 10)
    update_many(s, [1, 7], start=1, fillers=[[8, 7, 9]])  # target top-3 at position 1
    assert s.next_token([1]) == (7, True)
    update_many(s, [1, 6], start=1, fillers=[[8, 9]])  # sampled token outside the top-k
    assert s.next_token([1]) == (8, True)  # 8 and 9 counted twice, 8 more recently


def test_bad_arguments():
    with pytest.raises(DecodeKitError, match="n must be >= 2"):
        NGramStorage(1, 10)
    with pytest.raises(DecodeKitError, match="vocab_size"):
        OneLevelNGramStorage(3, 0)
    with pytest.raises(TypeError):
        INgramStorage(3, 10)  # abstract


class _Watched(list):
    """A history that records which positions drafting and updating read."""

    def __init__(self, items):
        super().__init__(items)
        self.read: set[int] = set()

    def __getitem__(self, i):
        if isinstance(i, slice):
            self.read.update(range(*i.indices(len(self))))
        else:
            self.read.add(i % len(self))
        return super().__getitem__(i)

    def __iter__(self):
        self.read.update(range(len(self)))
        return super().__iter__()


def test_drafting_reads_only_the_last_tokens_of_the_history():
    """Drafting costs a few dict look-ups however long the history: it reads the last n - 1
    tokens only, never scans the history (the cost check without a wall clock)."""
    rng = random.Random(0)
    history = [rng.randrange(49152) for _ in range(2000)]
    s = NGramStorage(4, 49152)
    s.initialize(history)
    watched = _Watched(history)
    assert len(s.draft(watched, 5)) == 5
    assert watched.read <= set(range(len(history) - 3, len(history)))
    watched = _Watched(history[:1006])
    update_many(s, watched, 1000, [[1, 2, 3]] * 6)
    assert min(watched.read) >= 1000 - 3  # the new positions and their n - 1 tokens of context
