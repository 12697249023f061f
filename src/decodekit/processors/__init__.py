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
too (``decodekit.seed``): ``probs = proc(logits)``, ``tokens = proc.sample(probs)``.

The package: ``steps.py`` (the processing steps), ``pipeline.py`` (``LogitsPipeline``,
``make_pipeline``), ``options.py`` (the knobs and their checks).

``GreedyProcessor`` returns a one-hot distribution on the argmax. That matters for
speculative decoding: verifying drafts against a one-hot target accepts exactly the
greedy token, so greedy speculation reproduces greedy decoding token for token.
"""

from decodekit.processors.options import (
    KNOBS,
    PROCESSOR_OPTIONS,
    Knob,
    check_min_new_tokens,
    check_processor_options,
    is_set,
    sampling_knobs,
)
from decodekit.processors.pipeline import LogitsPipeline, make_pipeline
from decodekit.processors.steps import (
    BadWords,
    HistoryProcessor,
    LogitBias,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    token_counts,
    top_k_filtering,
    top_p_filtering,
)

__all__ = [
    "top_k_filtering",
    "top_p_filtering",
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
    "KNOBS",
    "Knob",
    "sampling_knobs",
    "is_set",
    "token_counts",
]
