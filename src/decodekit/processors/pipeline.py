"""The pipeline: processing steps run in transformers' order on float32 logits, then the
final distribution (a one-hot argmax when greedy) and sampling from it. ``make_pipeline``
builds one from the knobs (``options.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from decodekit.processors.options import KNOBS, check_processor_options, is_set
from decodekit.processors.steps import (
    HistoryProcessor,
    id_list,
)
from decodekit.validation import DecodeKitError

__all__ = ["LogitsPipeline", "make_pipeline", "knob_steps"]


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


def knob_steps(knobs: Mapping, eos_token_id, stage: str) -> list[HistoryProcessor]:
    """The processing steps of the set ``knobs`` in one ``stage`` (``Knob.stage``), in the
    order of ``KNOBS`` (transformers' order)."""
    eos = id_list(eos_token_id)
    steps = []
    for name, knob in KNOBS.items():
        if knob.stage == stage and knob.step is not None:
            value = knobs.get(name)
            step = knob.step(value, knobs, eos) if is_set(value) else None
            if step is not None:
                steps.append(step)
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
    logits_processor=None,
    eos_token_id: int | list[int] | None = None,
    vocab_size: int | None = None,
    **knobs,
) -> LogitsPipeline:
    """The pipeline for the knobs (``KNOBS``: min_p, typical_p, repetition_penalty,
    presence_penalty, frequency_penalty, no_repeat_ngram_size, logit_bias, bad_words_ids,
    suppress_tokens, min_new_tokens, ignore_eos and any registered one), in transformers'
    order: the history knobs, then the user's ``logits_processor``; when sampling, then
    temperature, top_k, top_p, min_p, typical_p. Temperature 0 (or None) is greedy: the
    sampling knobs are skipped, as transformers skips them without ``do_sample``.

    ``logits_processor`` may also be a decodekit processor (``TopKProcessor``...): its steps
    and greedy/sampling mode replace temperature/top_k/top_p/min_p/typical_p."""
    knobs = dict(knobs, temperature=temperature, top_k=top_k, top_p=top_p)
    check_processor_options(knobs, vocab_size)
    knobs = {k: v for k, v in knobs.items() if is_set(v)}
    steps = knob_steps(knobs, eos_token_id, "history")
    if isinstance(logits_processor, LogitsPipeline):
        return _merge_pipeline(knobs, steps, logits_processor)
    steps += _user_steps(logits_processor)
    if temperature is None or temperature == 0:
        return LogitsPipeline(steps, greedy=True, temperature=None)
    return LogitsPipeline(steps + knob_steps(knobs, eos_token_id, "sampling"), greedy=False,
                          temperature=float(temperature))


def _merge_pipeline(options: Mapping, steps: list, pipeline: LogitsPipeline) -> LogitsPipeline:
    """History steps, then a decodekit processor's own steps and mode."""
    given = [name for name, knob in KNOBS.items() if knob.stage == "sampling" and options.get(name) is not None]
    if given:
        raise DecodeKitError(f"pass either a decodekit logits_processor or {', '.join(given)}, not both")
    return LogitsPipeline(steps + pipeline.processors, greedy=pipeline.is_greedy, temperature=pipeline.temperature)
