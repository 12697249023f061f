"""Logits processors: turn logits into a probability distribution, and sample from it.

A processor is called like transformers' ``LogitsProcessor``:
``proc(input_ids [B, T], logits [B, V]) -> logits [B, V]``; it sees the tokens so far.
``LogitsPipeline`` runs processors in transformers' order and gives the final distribution:
biases and penalties on the raw logits, then a user's own processors, then temperature, then
the filters (top-k, top-p, min-p, typical-p). A user's transformers ``LogitsProcessor`` /
``LogitsProcessorList`` works unchanged inside it. ``make_pipeline`` builds one from the knobs.

decodekit's own processors also take ``prompt_lengths`` [B] (where each row's generated tokens
start in ``input_ids``, left padding included) and ``pad_lengths`` [B] (leading pad positions,
ignored like transformers ignores them through the attention mask).

Every processor works on ``[B, V]`` logits (filters also on ``[B, T, V]``) and never modifies
the caller's tensor. The seed classes (``GreedyProcessor``, ``TopKProcessor``...) are pipelines
too: ``probs = proc(logits)``, ``tokens = proc.sample(probs)``.

``GreedyProcessor`` returns a one-hot distribution on the argmax. That matters for
speculative decoding: verifying drafts against a one-hot target accepts exactly the
greedy token, so greedy speculation reproduces greedy decoding token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from decodekit.validation import DecodeKitError, check_float, check_int, check_top_p

__all__ = [
    "LogitsProcessor",
    "GreedyProcessor",
    "MultinomialProcessor",
    "TopKProcessor",
    "NucleusProcessor",
    "TopKNucleusProcessor",
    "top_k_filtering",
    "top_p_filtering",
    "make_processor",
    "HistoryProcessor",
    "LogitsPipeline",
    "make_pipeline",
    "check_processor_options",
    "check_min_new_tokens",
    "LogitBias",
    "RepetitionPenalty",
    "PresenceFrequencyPenalty",
    "NoRepeatNGram",
    "BadWords",
    "SuppressTokens",
    "MinNewTokens",
    "Temperature",
    "TopK",
    "TopP",
    "MinP",
    "TypicalP",
    "PROCESSOR_OPTIONS",
    "token_counts",
]


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
        eos = set(_id_list(eos_token_id))
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
        self.eos_token_id = _id_list(eos_token_id)
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


def _id_list(token_ids) -> list[int]:
    """``None | int | list | tensor`` of token ids -> list of ints."""
    if token_ids is None:
        return []
    if isinstance(token_ids, Tensor):
        return [int(t) for t in token_ids.reshape(-1).tolist()]
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(t) for t in token_ids]


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class LogitsPipeline:
    """Processors run in order on float32 logits, then softmax (a one-hot argmax when greedy).

    ``processors`` are decodekit ``HistoryProcessor`` s or any transformers-style callable
    ``proc(input_ids, scores) -> scores`` (a user's ``LogitsProcessor`` / ``LogitsProcessorList``).

    - ``process(input_ids, logits, prompt_lengths=None, pad_lengths=None)`` -> probabilities;
      ``logits`` is ``[B, V]`` (the next token after ``input_ids [B, T]``) or ``[B, K, V]``,
      where ``logits[:, j]`` follows ``input_ids[:, :T - K + 1 + j]`` (so ``logits[:, -1]``
      follows the whole history: draft positions see the drafts before them).
    - ``process_logits(...)``: the same before the softmax (``log_softmax`` of it gives the
      log-probabilities of the final distribution).
    - ``__call__(logits)``: no history, for pipelines whose processors need none.
    - ``sample(probs, generator=None)``, ``is_greedy``, ``temperature``, ``needs_history``.
    """

    is_greedy = False

    def __init__(self, processors: Iterable[Callable] = (), greedy: bool = False, temperature=None):
        self.processors = list(processors)
        self.is_greedy = bool(greedy)
        self.temperature = temperature

    @property
    def needs_history(self) -> bool:
        """Whether some processor reads ``input_ids`` (a foreign one is assumed to)."""
        return any(getattr(proc, "needs_history", True) for proc in self.processors)

    def __call__(self, logits: Tensor) -> Tensor:
        """``[..., V]`` logits -> ``[..., V]`` float32 probabilities (input not modified)."""
        return self.distribution(self.process_logits(None, logits))

    def process(self, input_ids: Tensor, logits: Tensor, prompt_lengths=None, pad_lengths=None) -> Tensor:
        """History ``[B, T]`` + logits ``[B, V]`` or ``[B, K, V]`` -> float32 probabilities."""
        return self.distribution(self.process_logits(input_ids, logits, prompt_lengths, pad_lengths))

    def process_logits(self, input_ids, logits: Tensor, prompt_lengths=None, pad_lengths=None) -> Tensor:
        """The processed float32 logits (``logits`` is never modified; decodekit's processors
        work out of place, a foreign one gets a copy as it may work in place)."""
        foreign = any(not isinstance(proc, HistoryProcessor) for proc in self.processors)
        scores = logits.to(torch.float32, copy=foreign)  # [B, V] or [B, K, V]
        if not self.needs_history:
            return self._run(input_ids, scores, prompt_lengths, pad_lengths)
        if input_ids is None:
            names = ", ".join(type(p).__name__ for p in self.processors if getattr(p, "needs_history", True))
            raise DecodeKitError(f"processors {names} need the history: call process(input_ids, logits)")
        if scores.dim() == 2:
            return self._run(input_ids, scores, prompt_lengths, pad_lengths)
        first = input_ids.shape[1] - scores.shape[1] + 1  # history length of position 0
        if first < 0:
            raise DecodeKitError(f"logits has {scores.shape[1]} positions but input_ids only {input_ids.shape[1]} tokens")
        columns = [
            self._run(input_ids[:, : first + j], scores[:, j], prompt_lengths, pad_lengths)
            for j in range(scores.shape[1])
        ]
        return torch.stack(columns, dim=1)  # [B, K, V]

    def _run(self, input_ids, scores: Tensor, prompt_lengths, pad_lengths) -> Tensor:
        for proc in self.processors:
            if isinstance(proc, HistoryProcessor):
                scores = proc(input_ids, scores, prompt_lengths, pad_lengths)
            else:
                scores = proc(input_ids, scores)
        return scores

    @property
    def greedy_rows(self) -> bool | Tensor:
        """Which rows ``verify`` decodes by argmax: one bool for the batch here (a pipeline of
        per-row processors, ``decodekit.serve.mixed.RowProcessors``, gives ``[B]``)."""
        return self.is_greedy

    def select_rows(self, keep: list[int]) -> None:
        """Rows left the batch: a processor with per-row settings (``decodekit.constraints.
        RowConstraints``) keeps its rows ``keep``; the others are shared by every row."""
        for proc in self.processors:
            if hasattr(proc, "select_rows"):
                proc.select_rows(keep)

    def add_rows(self, other: LogitsPipeline) -> None:
        """Rows joined the batch (continuous batching): one shared pipeline keeps itself."""

    def distribution(self, scores: Tensor) -> Tensor:
        """Processed logits -> probabilities: softmax, or the one-hot argmax when greedy."""
        if self.is_greedy:
            best = scores.argmax(dim=-1, keepdim=True)  # [..., 1]
            return torch.zeros(scores.shape, dtype=torch.float32, device=scores.device).scatter_(-1, best, 1.0)
        return torch.softmax(scores, dim=-1)

    def sample(self, probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, V]`` or ``[B, T, V]`` probabilities -> ``[B]`` or ``[B, T]`` token ids."""
        if self.is_greedy:
            return probs.argmax(dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator)
        return tokens.reshape(probs.shape[:-1])

    def __repr__(self) -> str:
        mode = "greedy" if self.is_greedy else "sample"
        return f"{type(self).__name__}({mode}, {self.processors!r})"


# ---------------------------------------------------------------------------------------------
# The seed processors: pipelines of temperature + one filter
# ---------------------------------------------------------------------------------------------


class _SeedFilter(HistoryProcessor):
    """The ``_process`` hook of a seed processor, as a pipeline step."""

    needs_history = False

    def __init__(self, owner: LogitsProcessor):
        self.owner = owner

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        return self.owner._process(logits)

    def __repr__(self) -> str:
        return f"{type(self.owner).__name__}._process"


class LogitsProcessor(LogitsPipeline):
    """Base of the seed processors: ``probs = processor(logits)``, ``tokens = processor.sample(probs)``.

    A pipeline of ``Temperature`` then the subclass's ``_process`` filter."""

    is_greedy = False

    def __init__(self, temperature: float = 1.0):
        check_float("temperature", temperature, min_value=0.0, min_inclusive=False)
        steps = [] if type(self).is_greedy else [Temperature(temperature), _SeedFilter(self)]
        super().__init__(steps, greedy=type(self).is_greedy, temperature=float(temperature))

    def _process(self, logits: Tensor) -> Tensor:
        return logits

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k not in ("processors", "is_greedy"))
        return f"{type(self).__name__}({fields})"


class GreedyProcessor(LogitsProcessor):
    """Argmax decoding. ``__call__`` returns the one-hot distribution of the argmax."""

    is_greedy = True

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature)


class MultinomialProcessor(LogitsProcessor):
    """Sample from the full softmax at ``temperature``."""


class TopKProcessor(LogitsProcessor):
    """Sample among the ``top_k`` most likely tokens."""

    def __init__(self, temperature: float, top_k: int):
        super().__init__(temperature)
        check_int("top_k", top_k, min_value=1)
        self.top_k = int(top_k)

    def _process(self, logits: Tensor) -> Tensor:
        return top_k_filtering(logits, self.top_k)


class NucleusProcessor(LogitsProcessor):
    """Sample from the smallest set of tokens whose probability reaches ``top_p``."""

    def __init__(self, temperature: float, top_p: float):
        super().__init__(temperature)
        check_top_p(top_p)
        self.top_p = float(top_p)

    def _process(self, logits: Tensor) -> Tensor:
        return top_p_filtering(logits, self.top_p)


class TopKNucleusProcessor(LogitsProcessor):
    """Top-k first, then top-p over what is left."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        super().__init__(temperature)
        check_int("top_k", top_k, min_value=1)
        check_top_p(top_p)
        self.top_k = int(top_k)
        self.top_p = float(top_p)

    def _process(self, logits: Tensor) -> Tensor:
        return top_p_filtering(top_k_filtering(logits, self.top_k), self.top_p)


def make_processor(
    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
) -> LogitsProcessor:
    """The processor for the usual sampling knobs; temperature 0 (or None) means greedy."""
    if temperature is not None:
        check_float("temperature", temperature, min_value=0.0)
    if top_k is not None:
        check_int("top_k", top_k, min_value=1)
    if top_p is not None:
        check_top_p(top_p)
    if temperature is None or temperature == 0:
        return GreedyProcessor()
    use_k = top_k is not None and top_k > 0
    use_p = top_p is not None and top_p < 1.0
    if use_k and use_p:
        return TopKNucleusProcessor(temperature, top_k, top_p)
    if use_k:
        return TopKProcessor(temperature, top_k)
    if use_p:
        return NucleusProcessor(temperature, top_p)
    return MultinomialProcessor(temperature)


# ---------------------------------------------------------------------------------------------
# Options: validation and the factory
# ---------------------------------------------------------------------------------------------

# The knobs ``make_pipeline`` takes (transformers/OpenAI names) and their "off" values.
PROCESSOR_OPTIONS = {
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "min_p": None,
    "typical_p": None,
    "repetition_penalty": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "no_repeat_ngram_size": None,
    "logit_bias": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "min_new_tokens": None,
    "ignore_eos": False,
}


def check_min_new_tokens(min_new_tokens, max_new_tokens) -> None:
    """``min_new_tokens`` is an integer >= 0 and not above ``max_new_tokens`` (when both given)."""
    if min_new_tokens is None:
        return
    check_int("min_new_tokens", min_new_tokens, min_value=0)
    if max_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise DecodeKitError(f"min_new_tokens must be <= max_new_tokens ({max_new_tokens}), got {min_new_tokens}")


def check_processor_options(options: Mapping, vocab_size: int | None = None) -> None:
    """Raise a one-line ``DecodeKitError`` naming the first bad knob of ``options`` (names of
    ``PROCESSOR_OPTIONS``; None means unset). Token ids are checked against ``vocab_size``."""
    unknown = set(options) - set(PROCESSOR_OPTIONS)
    if unknown:
        raise TypeError(f"unknown processor options: {sorted(unknown)}")
    get = options.get
    _check_sampling(get("temperature"), get("top_k"), get("top_p"), get("min_p"), get("typical_p"))
    _check_penalties(get("repetition_penalty"), get("presence_penalty"), get("frequency_penalty"))
    if get("no_repeat_ngram_size") is not None:
        check_int("no_repeat_ngram_size", get("no_repeat_ngram_size"), min_value=0)
    check_min_new_tokens(get("min_new_tokens"), None)
    if not isinstance(get("ignore_eos", False), bool):
        raise DecodeKitError(f"ignore_eos must be True or False, got {get('ignore_eos')!r}")
    _check_logit_bias(get("logit_bias"), vocab_size)
    _check_token_lists(get("bad_words_ids"), get("suppress_tokens"), vocab_size)


def _check_sampling(temperature, top_k, top_p, min_p, typical_p) -> None:
    if temperature is not None:
        check_float("temperature", temperature, min_value=0.0)
    if top_k is not None:
        check_int("top_k", top_k, min_value=1)
    if top_p is not None:
        check_top_p(top_p)
    for name, value in (("min_p", min_p), ("typical_p", typical_p)):
        if value is not None:
            check_float(name, value)
            if not 0.0 <= value <= 1.0:
                raise DecodeKitError(f"{name} must be in [0, 1], got {value}")


def _check_penalties(repetition_penalty, presence_penalty, frequency_penalty) -> None:
    if repetition_penalty is not None:
        check_float("repetition_penalty", repetition_penalty, min_value=0.0, min_inclusive=False)
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None:
            check_float(name, value)
            if not -2.0 <= value <= 2.0:
                raise DecodeKitError(f"{name} must be in [-2, 2], got {value}")


def _check_token_id(name: str, token_id, vocab_size: int | None) -> None:
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
        raise DecodeKitError(f"{name} must hold token ids (integers >= 0), got {token_id!r}")
    if vocab_size is not None and token_id >= vocab_size:
        raise DecodeKitError(f"{name} token id {token_id} is out of the vocabulary (size {vocab_size})")


def _check_logit_bias(logit_bias, vocab_size: int | None) -> None:
    if logit_bias is None:
        return
    if not isinstance(logit_bias, Mapping):
        raise DecodeKitError(f"logit_bias must map token ids to biases, got {logit_bias!r}")
    for key, bias in logit_bias.items():
        token_id = int(key) if isinstance(key, str) and key.isdigit() else key
        _check_token_id("logit_bias", token_id, vocab_size)
        check_float(f"logit_bias[{key!r}]", bias, allow_inf=True)
        if bias == math.inf:
            raise DecodeKitError(f"logit_bias[{key!r}] must be finite or -inf, got {bias}")


def _check_token_lists(bad_words_ids, suppress_tokens, vocab_size: int | None) -> None:
    if bad_words_ids is not None:
        if not isinstance(bad_words_ids, list | tuple) or not all(isinstance(w, list | tuple) and w for w in bad_words_ids):
            raise DecodeKitError(f"bad_words_ids must be a list of non-empty lists of token ids, got {bad_words_ids!r}")
        for word in bad_words_ids:
            for token_id in word:
                _check_token_id("bad_words_ids", token_id, vocab_size)
    if suppress_tokens is not None:
        if not isinstance(suppress_tokens, list | tuple):
            raise DecodeKitError(f"suppress_tokens must be a list of token ids, got {suppress_tokens!r}")
        for token_id in suppress_tokens:
            _check_token_id("suppress_tokens", token_id, vocab_size)


def _history_steps(options: Mapping, eos_token_id) -> list[HistoryProcessor]:
    """Biases and penalties on the raw logits, in transformers' order."""
    get, steps = options.get, []
    if get("logit_bias"):
        steps.append(LogitBias(get("logit_bias")))
    if get("repetition_penalty") is not None and get("repetition_penalty") != 1.0:
        steps.append(RepetitionPenalty(get("repetition_penalty")))
    if get("presence_penalty") or get("frequency_penalty"):
        steps.append(PresenceFrequencyPenalty(get("presence_penalty") or 0.0, get("frequency_penalty") or 0.0))
    if get("no_repeat_ngram_size"):
        steps.append(NoRepeatNGram(get("no_repeat_ngram_size")))
    if get("bad_words_ids"):
        steps.append(BadWords(get("bad_words_ids"), eos_token_id))
    if get("min_new_tokens"):
        if not _id_list(eos_token_id):
            raise DecodeKitError("min_new_tokens needs an eos_token_id, and none is known")
        steps.append(MinNewTokens(get("min_new_tokens"), eos_token_id))
    if get("suppress_tokens"):
        steps.append(SuppressTokens(get("suppress_tokens")))
    if get("ignore_eos") and _id_list(eos_token_id):
        steps.append(SuppressTokens(_id_list(eos_token_id)))
    return steps


def _sampling_steps(options: Mapping) -> list[HistoryProcessor]:
    """Temperature, then the filters, in transformers' order (sampling only)."""
    get, steps = options.get, []
    if get("temperature") != 1.0:
        steps.append(Temperature(get("temperature")))
    if get("top_k"):
        steps.append(TopK(get("top_k")))
    if get("top_p") is not None and get("top_p") < 1.0:
        steps.append(TopP(get("top_p")))
    if get("min_p"):
        steps.append(MinP(get("min_p")))
    if get("typical_p") is not None and get("typical_p") < 1.0:
        steps.append(TypicalP(get("typical_p")))
    return steps


def _user_steps(logits_processor) -> list[Callable]:
    """A user's transformers ``LogitsProcessor``, ``LogitsProcessorList`` or list of callables."""
    if logits_processor is None:
        return []
    if isinstance(logits_processor, list | tuple):
        steps = list(logits_processor)
    else:
        steps = [logits_processor]
    for step in steps:
        if not callable(step) or isinstance(step, LogitsPipeline):
            raise DecodeKitError(
                f"logits_processor must be a decodekit processor, or callables proc(input_ids, scores), got {step!r}"
            )
    return steps


def make_pipeline(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    min_p: float | None = None,
    typical_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    logit_bias: Mapping[int, float] | None = None,
    bad_words_ids: list[list[int]] | None = None,
    suppress_tokens: list[int] | None = None,
    min_new_tokens: int | None = None,
    ignore_eos: bool = False,
    logits_processor=None,
    eos_token_id: int | list[int] | None = None,
    vocab_size: int | None = None,
) -> LogitsPipeline:
    """The pipeline for the knobs, in transformers' order: logit_bias, repetition_penalty,
    presence/frequency_penalty, no_repeat_ngram_size, bad_words_ids, min_new_tokens,
    suppress_tokens, ignore_eos, then the user's ``logits_processor``; when sampling, then
    temperature, top_k, top_p, min_p, typical_p. Temperature 0 (or None) is greedy: the
    filters are skipped, as transformers skips them without ``do_sample``.

    ``logits_processor`` may also be a decodekit processor (``TopKProcessor``...): its steps
    and greedy/sampling mode replace temperature/top_k/top_p/min_p/typical_p."""
    options = {name: value for name, value in locals().items() if name in PROCESSOR_OPTIONS}
    check_processor_options(options, vocab_size)
    steps = _history_steps(options, eos_token_id)
    if isinstance(logits_processor, LogitsPipeline):
        return _merge_pipeline(options, steps, logits_processor)
    steps += _user_steps(logits_processor)
    if temperature is None or temperature == 0:
        return LogitsPipeline(steps, greedy=True, temperature=None)
    return LogitsPipeline(steps + _sampling_steps(options), greedy=False, temperature=float(temperature))


def _merge_pipeline(options: Mapping, steps: list, pipeline: LogitsPipeline) -> LogitsPipeline:
    """History steps, then a decodekit processor's own steps and mode."""
    given = [k for k in ("temperature", "top_k", "top_p", "min_p", "typical_p") if options.get(k) is not None]
    if given:
        raise DecodeKitError(f"pass either a decodekit logits_processor or {', '.join(given)}, not both")
    return LogitsPipeline(steps + pipeline.processors, greedy=pipeline.is_greedy, temperature=pipeline.temperature)
