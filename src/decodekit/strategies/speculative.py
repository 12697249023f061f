"""Speculative decoding: a drafter proposes tokens, the target verifies them in ONE forward.

Every speculative strategy (draft model, self-speculative ``layers:N``, n-grams, prompt
lookup) runs the one loop of this module, ``speculative_loop``; they differ only in their
``Drafter``. One step, for a batch of rows that each accept a different number of drafts:

1. the draft-length policy picks a budget per row (``draft_policy.py``: fixed, EGAG, cost,
   adaptive), capped by the row's remaining tokens (drafts past ``max_new_tokens`` are waste),
2. the drafter proposes ``k`` tokens per row (``Draft``: tokens, how many are real, ``q``);
   the policy may keep only a prefix of each row's drafts (``adaptive``),
3. the target runs ``[last token, drafts]`` (``k + 1`` tokens) through its KV cache once,
4. ``verify`` (the shared rejection sampler) accepts a prefix per row and draws the
   recovered (after a rejection) or bonus (all accepted) token,
5. accepted drafts + that token go to the tracker; the target cache is rolled back per row
   (``ModelState.rollback``: rows that accepted fewer drafts get masked holes, so the batch
   never falls back to one row at a time); the drafter is told the result,
6. finished rows leave the batch; holes are compacted away now and then.

Greedy verification against a one-hot target reproduces greedy decoding token for token;
under sampling the output is distributed exactly as the target's (``verify.py``).
``first_target=False``: the target is prefilled with the prompt minus its last token, so
the drafter proposes the very first tokens too and the first verify step checks them.
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

# the loop, the drafter interface and the drafters live in session.py, drafting.py and
# drafters.py; their public names stay importable from here
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

