"""Speculative decoding with a draft model (strategy ``"speculative"``): its options and
``decode``. The loop every drafting strategy runs, step by step, is ``session.py``
(``DecodeSession``, ``speculative_loop``); the drafter interface is ``drafting.py``; model
drafters and drafter specs (``layers:N``, ``eagle``, ``X+prompt_lookup``, a model name) are
``drafters.py``. Their public names stay importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from decodekit.outputs import GenerationOutput
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.draft_policy import DraftOptions
from decodekit.strategies.drafters import ModelDrafter, early_exit_model, resolve_drafter
from decodekit.strategies.drafting import Draft, Drafter
from decodekit.strategies.options import option
from decodekit.strategies.session import DecodeSession, speculative_loop
from decodekit.validation import DecodeKitError

__all__ = [
    "Draft",
    "Drafter",
    "DecodeSession",
    "ModelDrafter",
    "speculative_loop",
    "early_exit_model",
    "resolve_drafter",
    "SpeculativeOptions",
    "make_drafter",
    "decode",
]


@dataclass(frozen=True)
class SpeculativeOptions(DraftOptions):
    """Options of strategy ``"speculative"``."""

    drafter: object = option(None, "draft model: bundled name, HF dir, .gguf, a loaded model, "
                             "layers:N (self-speculative: the target's first N layers), or eagle / "
                             "eagle:DIR (a trained draft head); X+prompt_lookup: prompt lookup where "
                             "the text repeats, X elsewhere", "any", parse=str)
    first_target: bool = option(True, "the first token of a step comes from the target", bool)
    skip_sample_adjustment: bool = option(False, "resample from p on rejection (LOSSY)", bool)
    show_drafts: bool = option(False, "record accepted drafts and target tokens for display", bool)

    def validate(self) -> None:
        super().validate()
        if self.drafter is None:
            raise DecodeKitError(
                "strategy 'speculative' needs drafter=... (a model, a model name, or layers:N)")


def make_drafter(req: DecodeRequest, opts: SpeculativeOptions) -> Drafter:
    """The drafter of ``opts.drafter`` for ``req`` (``resolve_drafter``; the server too)."""
    return resolve_drafter(opts.drafter, req)


def decode(req: DecodeRequest, opts: SpeculativeOptions) -> GenerationOutput:
    """Speculative decoding with a draft model (strategy ``"speculative"``).

    ``opts.drafter``: a causal LM with the target's vocabulary, a model name/path for
    ``load_model``, or ``"layers:N"`` (self-speculative: the target's first N layers + its
    head, sharing weights), ``"X+prompt_lookup"`` (prompt lookup where the row's text
    repeats, ``X`` elsewhere: ``strategies/hybrid.py``). ``draft_policy``: ``"cost"``
    (default: up to ``gamma_max`` drafts, as many as pay for themselves at this batch size,
    none where drafting loses to greedy), ``"fixed"`` (``gamma`` drafts per step),
    ``"egag"`` / ``"adaptive"`` (up to ``gamma_max``, default ``gamma``; egag and cost at
    least ``gamma_min``). ``skip_sample_adjustment=True`` resamples from p on
    rejection: LOSSY.
    """
    return speculative_loop(req, make_drafter(req, opts), opts.policy(), first_target=opts.first_target,
                            skip_sample_adjustment=opts.skip_sample_adjustment,
                            show_drafts=opts.show_drafts)

