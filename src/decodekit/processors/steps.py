"""The processing steps: each turns ``[B, V]`` logits (filters also ``[B, T, V]``) into new
logits, seeing the tokens so far, in transformers' ``LogitsProcessor`` call shape
``step(input_ids [B, T], logits) -> logits``. Also the filtering functions the strategies use
directly (``top_k_filtering``, ``top_p_filtering``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from decodekit.validation import DecodeKitError

__all__ = ["top_k_filtering", "top_p_filtering", "token_counts", "id_list", "HistoryProcessor", "LogitBias",
           "RepetitionPenalty", "PresenceFrequencyPenalty", "NoRepeatNGram", "BadWords", "SuppressTokens",
           "MinNewTokens", "Temperature", "TopK", "TopP", "MinP", "TypicalP"]


def top_k_filtering(logits: Tensor, top_k: int, filter_value: float = -float("inf")) -> Tensor:
    """Keep the ``top_k`` largest logits of the last dimension; returns a new tensor."""
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, filter_value)


def top_p_filtering(
    logits: Tensor,
    top_p: float = 1.0,
    min_tokens_to_keep: int = 1,
    filter_value: float = -float("inf"),
) -> Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability sums to ``top_p``.

    A token is kept when the probability mass of the tokens strictly more likely than it
    is below ``top_p`` (so the token that crosses the threshold is kept). At least
    ``min_tokens_to_keep`` tokens survive. Returns a new tensor; ``logits`` is untouched.
    """
    if top_p >= 1.0:
        return logits.clone()
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)  # [..., V]
    sorted_probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of better tokens
    remove_sorted = mass_before >= top_p
    remove_sorted[..., :min_tokens_to_keep] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, filter_value)


# ---------------------------------------------------------------------------------------------
# History-aware processors: proc(input_ids [B, T], logits [B, V], prompt_lengths, pad_lengths)
# ---------------------------------------------------------------------------------------------


def _rows(value, input_ids: Tensor) -> Tensor | None:
    """``None | int | [B] tensor`` -> ``None | [B]`` long tensor on ``input_ids``' device."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.to(device=input_ids.device, dtype=torch.long).reshape(-1)
    return torch.full((input_ids.shape[0],), int(value), dtype=torch.long, device=input_ids.device)


def _positions_from(input_ids: Tensor, start: Tensor | None) -> Tensor | None:
    """``[B, T]`` bool: position t of row b is at or after ``start[b]`` (None: every position)."""
    if start is None:
        return None
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
    return positions[None, :] >= start[:, None]


def token_counts(input_ids: Tensor, vocab: int, keep: Tensor | None = None) -> Tensor:
    """``[B, T]`` ids -> ``[B, vocab]`` float counts of each token over the kept positions.

    Ids at or beyond ``vocab`` (an embedding larger than the lm head) go to a spare column that
    is dropped, as in transformers."""
    ids = input_ids.clamp(max=vocab)  # [B, T]
    if keep is not None:
        ids = ids.masked_fill(~keep, vocab)
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def _id_mask(token_ids: Tensor, vocab: int, device) -> Tensor:
    """``[V]`` bool mask of ``token_ids`` (ids outside the vocabulary are ignored)."""
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    ids = token_ids.to(device)
    mask[ids[ids < vocab]] = True
    return mask


class HistoryProcessor:
    """Base of decodekit's processors: ``proc(input_ids [B, T], logits [B, V]) -> [B, V]``.

    Same call as transformers' ``LogitsProcessor``; decodekit's pipeline also passes
    ``prompt_lengths`` and ``pad_lengths`` ([B] or int). ``needs_history`` is False for the
    ones that read only the logits (they then also accept ``input_ids=None`` and ``[..., V]``).
    """

    needs_history = True

    def __call__(self, input_ids, logits: Tensor, prompt_lengths=None, pad_lengths=None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class LogitBias(HistoryProcessor):
    """OpenAI ``logit_bias``: add ``bias[token_id]`` to that token's logit (transformers'
    ``SequenceBiasLogitsProcessor`` with one-token sequences)."""

    needs_history = False

    def __init__(self, logit_bias: Mapping[int, float]):
        self.logit_bias = {int(k): float(v) for k, v in logit_bias.items()}
        self._ids = torch.tensor(list(self.logit_bias), dtype=torch.long)
        self._bias = torch.tensor(list(self.logit_bias.values()), dtype=torch.float32)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        vocab = logits.shape[-1]
        if self._ids.numel() and int(self._ids.max()) >= vocab:
            raise DecodeKitError(f"logit_bias keys must be token ids below the vocabulary size {vocab}")
        bias = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
        bias[self._ids.to(logits.device)] = self._bias.to(device=logits.device, dtype=logits.dtype)
        return logits + bias


class RepetitionPenalty(HistoryProcessor):
    """transformers' ``repetition_penalty``: every token of the history (prompt included, left
    padding excluded) has its logit divided by ``penalty`` when positive, multiplied when
    negative; once per token, however often it occurred."""

    def __init__(self, penalty: float):
        self.penalty = float(penalty)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        keep = _positions_from(input_ids, _rows(pad_lengths, input_ids))  # [B, T] | None
        seen = token_counts(input_ids, logits.shape[-1], keep) > 0  # [B, V]
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(seen, penalised, logits)


class PresenceFrequencyPenalty(HistoryProcessor):
    """OpenAI penalties over the GENERATED tokens (from ``prompt_lengths`` on; without it the
    whole history counts): ``logits -= frequency * count + presence * (count > 0)``."""

    def __init__(self, presence_penalty: float = 0.0, frequency_penalty: float = 0.0):
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        keep = _positions_from(input_ids, _rows(prompt_lengths, input_ids))  # [B, T] | None
        counts = token_counts(input_ids, logits.shape[-1], keep).to(logits.dtype)  # [B, V]
        penalty = self.frequency_penalty * counts + self.presence_penalty * (counts > 0).to(logits.dtype)
        return logits - penalty


class NoRepeatNGram(HistoryProcessor):
    """transformers' ``no_repeat_ngram_size``: a token that would complete an n-gram already in
    the history (prompt included) is banned."""

    def __init__(self, ngram_size: int):
        self.ngram_size = int(ngram_size)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        n, cur_len, vocab = self.ngram_size, input_ids.shape[-1], logits.shape[-1]
        if cur_len < n:
            return logits
        prefix = input_ids[:, cur_len + 1 - n :]  # [B, n-1]
        windows = input_ids.unfold(dimension=1, size=n, step=1)  # [B, W, n]
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # [B, W]
        banned = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return logits.masked_fill(banned[:, :vocab], -float("inf"))


class BadWords(HistoryProcessor):
    """transformers' ``bad_words_ids``: a one-token word is always banned; a longer one has its
    last token banned when the history ends with the rest. One-token words equal to an EOS id
    are dropped, as in transformers."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id=None):
        eos = set(id_list(eos_token_id))
        self.bad_words_ids = [list(w) for w in bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        self._single = torch.tensor([w[0] for w in self.bad_words_ids if len(w) == 1], dtype=torch.long)
        groups: dict[int, list[list[int]]] = {}
        for word in self.bad_words_ids:
            if len(word) > 1:
                groups.setdefault(len(word) - 1, []).append(word)
        # per prefix length: prefixes [G, L], last tokens [G]
        self._groups = [
            (torch.tensor([w[:-1] for w in ws]), torch.tensor([w[-1] for w in ws])) for ws in groups.values()
        ]

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        vocab, device = logits.shape[-1], logits.device
        banned = _id_mask(self._single, vocab, device)[None, :].expand(logits.shape[0], -1).float()
        for prefixes, last in self._groups:
            length = prefixes.shape[1]
            if length > input_ids.shape[1]:
                continue
            match = (input_ids[:, None, -length:] == prefixes.to(device)).all(dim=-1)  # [B, G]
            banned = banned.index_add(1, last.to(device), match.float())
        return logits.masked_fill(banned > 0, -float("inf"))


class SuppressTokens(HistoryProcessor):
    """transformers' ``suppress_tokens`` (and ``ignore_eos`` with the EOS ids): never generated."""

    needs_history = False

    def __init__(self, suppress_tokens: Iterable[int]):
        self.suppress_tokens = [int(t) for t in suppress_tokens]

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        ids = torch.tensor(self.suppress_tokens, dtype=torch.long)
        return logits.masked_fill(_id_mask(ids, logits.shape[-1], logits.device), -float("inf"))


class MinNewTokens(HistoryProcessor):
    """transformers' ``min_new_tokens``: EOS is banned while a row has fewer than
    ``min_new_tokens`` tokens after its prompt (``prompt_lengths``, per row)."""

    def __init__(self, min_new_tokens: int, eos_token_id, prompt_length: int | None = None):
        self.min_new_tokens = int(min_new_tokens)
        self.eos_token_id = id_list(eos_token_id)
        self.prompt_length = prompt_length

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        start = _rows(prompt_lengths if prompt_lengths is not None else self.prompt_length, input_ids)
        if start is None:
            raise DecodeKitError("min_new_tokens needs the prompt lengths (prompt_lengths)")
        short = (input_ids.shape[1] - start) < self.min_new_tokens  # [B]
        eos = _id_mask(torch.tensor(self.eos_token_id, dtype=torch.long), logits.shape[-1], logits.device)
        return logits.masked_fill(short[:, None] & eos[None, :], -float("inf"))


class Temperature(HistoryProcessor):
    """``logits / temperature``."""

    needs_history = False

    def __init__(self, temperature: float):
        self.temperature = float(temperature)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        return logits / self.temperature


class TopK(HistoryProcessor):
    """Keep the ``top_k`` largest logits."""

    needs_history = False

    def __init__(self, top_k: int):
        self.top_k = int(top_k)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        return top_k_filtering(logits, self.top_k)


class TopP(HistoryProcessor):
    """Nucleus filter: the smallest set of tokens whose probability reaches ``top_p``."""

    needs_history = False

    def __init__(self, top_p: float):
        self.top_p = float(top_p)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        return top_p_filtering(logits, self.top_p)


class MinP(HistoryProcessor):
    """transformers' ``min_p``: drop tokens less likely than ``min_p`` times the top token."""

    needs_history = False

    def __init__(self, min_p: float):
        self.min_p = float(min_p)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        probs = torch.softmax(logits, dim=-1)  # [..., V]
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        return logits.masked_fill(remove, -float("inf"))


class TypicalP(HistoryProcessor):
    """transformers' ``typical_p`` (locally typical sampling): keep the tokens whose surprisal
    is closest to the entropy, until their mass reaches ``typical_p``."""

    needs_history = False

    def __init__(self, typical_p: float):
        self.typical_p = float(typical_p)

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        logp = torch.log_softmax(logits, dim=-1)  # [..., V]
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # [..., 1]
        shifted, order = torch.sort((-logp - entropy).abs(), dim=-1)
        mass = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (mass < self.typical_p).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
        remove_sorted = shifted > shifted.gather(-1, last)
        remove_sorted[..., :1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        return logits.masked_fill(remove, -float("inf"))


def id_list(token_ids) -> list[int]:
    """``None | int | list | tensor`` of token ids -> list of ints."""
    if token_ids is None:
        return []
    if isinstance(token_ids, Tensor):
        return [int(t) for t in token_ids.reshape(-1).tolist()]
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(t) for t in token_ids]
