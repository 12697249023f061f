"""N-gram storages: the drafter of n-gram assisted speculative decoding (NASD).

An n-gram storage counts which token followed which context and predicts the next token
of a context from those counts. Vocabulary:

* an *n-gram* is ``n`` tokens: a context of ``n - 1`` tokens and the token that followed;
* the *order* of an n-gram is its length ``n`` (a bigram has order 2, one context token).

``NGramStorage(n, vocab_size)`` keeps every order ``2..n`` and *backs off*: it predicts
from the longest context (``n - 1`` tokens) it has seen, else from ``n - 2`` tokens, ...
down to one token (bigrams). ``OneLevelNGramStorage(n, vocab_size)`` keeps order ``n``
only.

Tie rule: the prediction for a context is its most frequent next token; among tokens
with the same count, the one counted most recently wins. Updates are O(1) per count
(the best token is kept alongside the counts), lookups are one dict access per order:
drafting costs microseconds, far below one model forward.

A context that no order knows yields ``known=False`` and the *fallback* token: the most
frequent token seen overall (ties -> most recent), or 0 in an empty storage. The seed
returned a random token there; a deterministic fallback keeps greedy runs reproducible.

Contexts and tokens are plain ``int`` sequences (lists, tuples or 1-D tensors); a
``[1, T]`` tensor is accepted too, for the seed's calling convention.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from torch import Tensor

from decodekit.validation import check_int

__all__ = ["INgramStorage", "NGramStorage", "OneLevelNGramStorage"]


def _as_tokens(seq, last: int | None = None) -> list[int]:
    """A context as a list of ints (its ``last`` tokens only, if given).

    Accepts ``list``/``tuple``/``int``/``[T]``/``[1, T]`` tensors; slicing happens before
    conversion so a long history costs nothing.
    """
    if isinstance(seq, int) or (isinstance(seq, Tensor) and seq.dim() == 0):
        seq = [int(seq)]
    elif isinstance(seq, Tensor) and seq.dim() > 1:
        if seq.shape[0] != 1:
            raise ValueError(f"expected one sequence, got a tensor of shape {tuple(seq.shape)}")
        seq = seq[0]
    if last is not None:
        seq = seq[len(seq) - last :] if len(seq) > last else seq
    if isinstance(seq, Tensor):
        return seq.tolist()
    return [int(t) for t in seq]


def _as_rows(input_ids) -> list[list[int]]:
    """One sequence or a batch (``[B, T]`` tensor, list of lists) -> list of rows."""
    if isinstance(input_ids, Tensor):
        return [input_ids.tolist()] if input_ids.dim() == 1 else input_ids.tolist()
    rows = list(input_ids)
    if not rows or isinstance(rows[0], int):
        return [[int(t) for t in rows]]
    return [_as_tokens(r) for r in rows]


class _Counts:
    """Next-token counts of one context, with the current best token (tie rule above)."""

    __slots__ = ("counts", "best", "best_count")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.best = -1
        self.best_count = 0

    def add(self, token: int) -> None:
        count = self.counts.get(token, 0) + 1
        self.counts[token] = count
        if count >= self.best_count:  # ">=": ties go to the most recent token
            self.best, self.best_count = token, count


class INgramStorage(abc.ABC):
    """Interface of an n-gram storage (see the module docstring for the semantics)."""

    def __init__(self, n: int, vocab_size: int):
        self.n = check_int("n", n, min_value=2)
        self.vocab_size = check_int("vocab_size", vocab_size, min_value=1)

    @abc.abstractmethod
    def next_token(self, ctx) -> tuple[int, bool]:
        """Most likely token after ``ctx``; ``known`` is False when no order knows it."""

    def lookup(self, ctx) -> tuple[int, int]:
        """``(token, order)``: the prediction and the order of the n-gram that made it
        (0 when no order knows the context). Drafters use the order as evidence strength."""
        token, known = self.next_token(ctx)
        return token, (self.n if known else 0)

    @abc.abstractmethod
    def has_gram(self, ngram) -> bool:
        """Whether ``ngram[-1]`` was counted after the context ``ngram[:-1]``."""

    @abc.abstractmethod
    def update(self, ctx, next_tokens) -> None:
        """Count each token of ``next_tokens`` (an int or a sequence) as following ``ctx``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every count."""

    def initialize(self, input_ids) -> None:
        """Count every n-gram of a sequence (or of each row of a batch)."""
        for row in _as_rows(input_ids):
            for i in range(1, len(row)):
                self.update(row[max(0, i - self.n + 1) : i], row[i])

    def draft(self, ctx, k: int, stop_if_unknown: bool = False) -> list[int]:
        """Up to ``k`` tokens predicted greedily one after the other from ``ctx``.

        With ``stop_if_unknown`` drafting stops at the first unknown context (so fewer
        than ``k`` tokens, possibly none, come back).
        """
        window = _as_tokens(ctx, self.n - 1)
        out: list[int] = []
        for _ in range(k):
            token, known = self.next_token(window)
            if not known and stop_if_unknown:
                break
            out.append(token)
            window = (window + [token])[-(self.n - 1) :]
        return out


class NGramStorage(INgramStorage):
    """Orders ``2..n`` with backoff to the longest known context."""

    def __init__(self, n: int, vocab_size: int):
        super().__init__(n, vocab_size)
        self.reset()

    def reset(self) -> None:
        # order j (2..n) -> context tuple (j - 1 tokens) -> counts
        self.levels: dict[int, dict[tuple[int, ...], _Counts]] = {j: {} for j in range(2, self.n + 1)}
        self.unigrams = _Counts()

    def next_token(self, ctx) -> tuple[int, bool]:
        token, order = self.lookup(ctx)
        return token, order > 0

    def lookup(self, ctx) -> tuple[int, int]:
        tokens = _as_tokens(ctx, self.n - 1)
        for order in range(min(self.n, len(tokens) + 1), 1, -1):
            counts = self.levels[order].get(tuple(tokens[len(tokens) - order + 1 :]))
            if counts is not None:
                return counts.best, order
        return max(self.unigrams.best, 0), 0

    def has_gram(self, ngram) -> bool:
        tokens = _as_tokens(ngram, self.n)
        if len(tokens) < 2:
            return False
        counts = self.levels[len(tokens)].get(tuple(tokens[:-1]))
        return counts is not None and tokens[-1] in counts.counts

    def update(self, ctx, next_tokens) -> None:
        tokens = _as_tokens(ctx, self.n - 1)
        new = _as_tokens(next_tokens)
        for order in range(2, len(tokens) + 2):
            key = tuple(tokens[len(tokens) - order + 1 :])
            counts = self.levels[order].get(key)
            if counts is None:
                counts = self.levels[order][key] = _Counts()
            for token in new:
                counts.add(token)
        for token in new:
            self.unigrams.add(token)

    def __len__(self) -> int:
        """Number of distinct n-grams stored, all orders together."""
        return sum(len(c.counts) for level in self.levels.values() for c in level.values())


class OneLevelNGramStorage(INgramStorage):
    """Order ``n`` only: contexts of exactly ``n - 1`` tokens, no backoff."""

    def __init__(self, n: int, vocab_size: int):
        super().__init__(n, vocab_size)
        self.reset()

    def reset(self) -> None:
        self.grams: dict[tuple[int, ...], _Counts] = {}
        self.unigrams = _Counts()

    def next_token(self, ctx) -> tuple[int, bool]:
        tokens = _as_tokens(ctx, self.n - 1)
        if len(tokens) >= self.n - 1:
            counts = self.grams.get(tuple(tokens[len(tokens) - self.n + 1 :]))
            if counts is not None:
                return counts.best, True
        return max(self.unigrams.best, 0), False

    def has_gram(self, ngram) -> bool:
        tokens = _as_tokens(ngram, self.n)
        if len(tokens) < self.n:
            return False
        counts = self.grams.get(tuple(tokens[:-1]))
        return counts is not None and tokens[-1] in counts.counts

    def update(self, ctx, next_tokens) -> None:
        tokens = _as_tokens(ctx, self.n - 1)
        new = _as_tokens(next_tokens)
        for token in new:
            self.unigrams.add(token)
        if len(tokens) < self.n - 1:
            return
        key = tuple(tokens[len(tokens) - self.n + 1 :])
        counts = self.grams.get(key)
        if counts is None:
            counts = self.grams[key] = _Counts()
        for token in new:
            counts.add(token)

    def __len__(self) -> int:
        return sum(len(c.counts) for c in self.grams.values())


def update_many(
    storage: INgramStorage, history: Sequence[int], start: int, fillers: Sequence[Sequence[int]] | None = None
) -> None:
    """Count ``history[i]`` after ``history[:i]`` for every position ``i >= start``.

    ``fillers[i - start]`` (optional) are extra tokens counted at position ``i`` (the
    target's top-k there, best first). They are counted before the real token and in
    reverse order, so that under the tie rule the real token wins, then the target's
    top-1, and so on.
    """
    for i in range(max(start, 1), len(history)):
        ctx = history[max(0, i - storage.n + 1) : i]
        if fillers is not None and i - start < len(fillers):
            storage.update(ctx, list(reversed(fillers[i - start])))
        storage.update(ctx, history[i])
