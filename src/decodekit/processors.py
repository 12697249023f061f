"""Logits processors: turn logits into a probability distribution, and sample from it.

Every processor works on ``[B, V]`` and ``[B, T, V]`` logits and never modifies the
caller's tensor. The order of operations is the one of transformers and vLLM:
temperature first, then top-k, then top-p, then softmax.

``GreedyProcessor`` returns a one-hot distribution on the argmax. That matters for
speculative decoding: verifying drafts against a one-hot target accepts exactly the
greedy token, so greedy speculation reproduces greedy decoding token for token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from decodekit.validation import check_float, check_int, check_top_p

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


class LogitsProcessor:
    """Base class: ``probs = processor(logits)``, ``tokens = processor.sample(probs)``."""

    is_greedy = False

    def __init__(self, temperature: float = 1.0):
        check_float("temperature", temperature, min_value=0.0, min_inclusive=False)
        self.temperature = float(temperature)

    def __call__(self, logits: Tensor) -> Tensor:
        """``[..., V]`` logits -> ``[..., V]`` float32 probabilities (input not modified)."""
        scaled = logits.float() / self.temperature  # new tensor
        return torch.softmax(self._process(scaled), dim=-1)

    def _process(self, logits: Tensor) -> Tensor:
        return logits

    def sample(self, probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, V]`` or ``[B, T, V]`` probabilities -> ``[B]`` or ``[B, T]`` token ids."""
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator)
        return tokens.reshape(probs.shape[:-1])

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class GreedyProcessor(LogitsProcessor):
    """Argmax decoding. ``__call__`` returns the one-hot distribution of the argmax."""

    is_greedy = True

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature)

    def __call__(self, logits: Tensor) -> Tensor:
        best = logits.argmax(dim=-1, keepdim=True)  # [..., 1]
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(
            -1, best, 1.0
        )

    def sample(self, probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return probs.argmax(dim=-1)


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
