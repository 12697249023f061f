"""Quality metrics for comparing decoding strategies (used by the benchmark).

* ``continuation_loglik``: the model's own log-likelihood of a generated continuation
  (higher = the model finds the text more likely; greedy-like strategies score high),
* ``distinct_n``: share of distinct n-grams (low = repetitive text),
* ``exact_match``: does an answer contain / equal the gold answer (SQuAD-style
  normalisation, several aliases allowed), scored by ``decodekit bench`` on the small
  arithmetic/factual question set shipped as ``decodekit/data/qa.jsonl``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["continuation_loglik", "distinct_n", "exact_match", "normalize_answer"]


def _as_list(ids) -> list[int]:
    if isinstance(ids, Tensor):
        return ids.reshape(-1).tolist()
    return [int(t) for t in ids]


@torch.inference_mode()
def continuation_loglik(model, prompt_ids, continuation_ids) -> tuple[float, float]:
    """``sum`` and ``mean`` over the continuation's tokens of ``log p(token | prompt, earlier
    tokens)`` under ``model`` (its plain log-softmax, temperature 1), from one forward pass.

    ``prompt_ids``/``continuation_ids``: lists of ids or 1-D tensors; the prompt must not
    be empty. An empty continuation gives ``(0.0, 0.0)``.
    """
    prompt, cont = _as_list(prompt_ids), _as_list(continuation_ids)
    if not prompt:
        raise ValueError("prompt_ids must hold at least one token")
    if not cont:
        return 0.0, 0.0
    ids = torch.tensor([prompt + cont], dtype=torch.long, device=model.device)  # [1, T]
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1]  # [C, V]
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont, device=logp.device)[:, None]  # [C, 1]
    token_logp = logp.gather(-1, target)[:, 0]  # [C]
    total = float(token_logp.sum())
    return total, total / len(cont)


def _ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens, n: int) -> float:
    """Distinct n-grams / all n-grams.

    ``tokens``: one sequence (ids or words), or a list of sequences (n-grams are taken
    within each sequence and pooled: corpus-level distinct-n). 0.0 when there is no n-gram.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(tokens, Tensor):
        tokens = tokens.tolist()
    seqs = tokens if tokens and isinstance(tokens[0], list | tuple | Tensor) else [tokens]
    grams = [g for seq in seqs for g in _ngrams(_as_list(seq) if isinstance(seq, Tensor) else list(seq), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"(?<=\d),(?=\d{3}\b)")  # thousands separators: 1,000 -> 1000


def normalize_answer(text: str) -> str:
    """Lower case, drop thousands separators, punctuation (a decimal point between digits
    stays), articles and extra spaces; ``84.0`` -> ``84``."""
    text = _NUMBER.sub("", text.lower())
    text = re.sub(r"(\d)\.0+\b", r"\1", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    text = "".join(ch if ch not in string.punctuation or ch == "." else " " for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(answer_text: str, gold: str | Sequence[str], strict: bool = False) -> bool:
    """Does ``answer_text`` give the gold answer (``gold``: one string or a list of aliases)?

    After ``normalize_answer``, an alias matches when it appears in the answer as a
    whole-word span (chat models answer in sentences: "12 times 7 is 84." matches "84", but
    "184" does not); ``strict=True`` requires the whole answer to equal an alias.
    """
    aliases = [gold] if isinstance(gold, str) else list(gold)
    answer = normalize_answer(answer_text)
    for alias in aliases:
        alias = normalize_answer(alias)
        if not alias:
            continue
        if answer == alias:
            return True
        if not strict and re.search(rf"(?<!\S){re.escape(alias)}(?!\S)", answer):
            return True
    return False
