"""Draft-length policies: how many tokens the drafter proposes before each verify step.

A policy answers ``choose(rows) -> budget [B]`` (drafts per active row) and learns from
``observe(drafted [B], accepted [B])`` after each verify step.

* ``fixed``: always ``gamma``.
* ``egag`` (entropy-guided adaptive gamma, SPEC §5): per row, the drafter's distribution for
  the next position at temperature T (no top-k/top-p), ``H = -sum p log(p + 1e-8)``,
  ``H_norm = H / log V``, ``g = int((1 - H_norm) * gamma_max)`` clamped to
  ``[gamma_min, gamma_max]``; with ``beta > 0`` an EMA (``ema = g`` on the first step, then
  ``beta * ema + (1 - beta) * g``, budget ``round(ema)``). A confident drafter drafts long,
  an unsure one short. The drafter forward that produced those probabilities is reused as
  the first draft step (``ModelDrafter.first_logits``), so EGAG costs no extra forward.
* ``cost``: pick the ``k`` that maximises expected tokens per second, from the measured
  cost of a target forward with ``n`` tokens on this machine and the running acceptance
  rate (see ``CostPolicy``).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import Tensor

from decodekit.validation import DecodeKitError, check_choice, check_float, check_int

__all__ = [
    "DraftPolicy",
    "FixedPolicy",
    "EgagPolicy",
    "CostPolicy",
    "CostCurve",
    "POLICIES",
    "make_policy",
    "forward_cost_curve",
    "expected_tokens",
    "egag_gamma",
]


class DraftPolicy:
    """Base class: a fixed budget of ``gamma`` drafts per row."""

    name = "fixed"

    def __init__(self, gamma: int = 5):
        self.gamma = gamma

    def start(self, req, drafter) -> None:
        """Once, before the first step (after the drafter's prefill)."""

    def choose(self, rows: list[list[int]]) -> Tensor:
        """Draft budget per active row, ``[B]`` ints >= 0."""
        return torch.full((len(rows),), self.gamma, dtype=torch.long)

    def observe(self, drafted: Tensor, accepted: Tensor) -> None:
        """After each verify step: drafts proposed and accepted per row, ``[B]``."""

    def select_rows(self, index: Tensor) -> None:
        """Finished rows left the batch."""


class FixedPolicy(DraftPolicy):
    """Always ``gamma`` drafts."""


# ---------------------------------------------------------------------------- EGAG
def egag_gamma(logits: Tensor, temperature: float, gamma_min: int, gamma_max: int) -> Tensor:
    """``logits [B, V]`` of the drafter -> entropy-guided budget ``g [B]`` (SPEC §5)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # no top-k/top-p
    entropy = -(probs * torch.log(probs + 1e-8)).sum(-1)  # [B]
    h_norm = entropy / math.log(logits.shape[-1])
    g = ((1.0 - h_norm) * gamma_max).floor().long()  # int() of a value >= 0
    return g.clamp(gamma_min, gamma_max)


class EgagPolicy(DraftPolicy):
    """Entropy-guided adaptive gamma, per row, with an optional EMA (module docstring)."""

    name = "egag"

    def __init__(self, gamma_min: int, gamma_max: int, beta: float):
        super().__init__(gamma_max)
        self.gamma_min, self.gamma_max, self.beta = gamma_min, gamma_max, beta
        self.ema: Tensor | None = None  # [B] float
        self.drafter = None
        self.temperature = 1.0

    def start(self, req, drafter) -> None:
        if not hasattr(drafter, "first_logits"):
            raise DecodeKitError(
                f"draft_policy 'egag' needs a drafter with probabilities (a draft model); "
                f"{drafter.name!r} has none: use draft_policy 'fixed' or 'cost'"
            )
        self.drafter = drafter
        self.temperature = float(getattr(req.processor, "temperature", 1.0) or 1.0)

    def choose(self, rows: list[list[int]]) -> Tensor:
        logits = self.drafter.first_logits(rows)  # [B, V], reused as the first draft step
        g = egag_gamma(logits, self.temperature, self.gamma_min, self.gamma_max).cpu()
        if self.beta <= 0:
            return g
        if self.ema is None:
            self.ema = g.float()
        else:
            self.ema = self.beta * self.ema + (1.0 - self.beta) * g.float()
        return torch.round(self.ema).long()

    def select_rows(self, index: Tensor) -> None:
        if self.ema is not None:
            self.ema = self.ema.index_select(0, index.cpu())


# ---------------------------------------------------------------------------- cost model
class CostCurve:
    """Measured seconds of one forward with ``n`` new tokens; linear in between points."""

    def __init__(self):
        self.points: dict[int, float] = {}

    def __call__(self, n: int) -> float:
        if n in self.points:
            return self.points[n]
        xs = sorted(self.points)
        if n <= xs[0]:
            return self.points[xs[0]]
        if n >= xs[-1]:  # beyond the measured range: extend the last slope
            x0, x1 = (xs[-2], xs[-1]) if len(xs) > 1 else (xs[-1], xs[-1])
            slope = (self.points[x1] - self.points[x0]) / (x1 - x0) if x1 > x0 else 0.0
            return self.points[x1] + slope * (n - x1)
        hi = next(x for x in xs if x > n)
        lo = max(x for x in xs if x < n)
        w = (n - lo) / (hi - lo)
        return (1 - w) * self.points[lo] + w * self.points[hi]

    def as_dict(self) -> dict[int, float]:
        return dict(sorted(self.points.items()))


_GRID = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)
_CURVES: dict[tuple, CostCurve] = {}  # measured once per model/dtype/device, in memory


def _model_key(model) -> tuple:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    param = next(model.parameters())
    return (type(model).__name__, getattr(cfg, "_name_or_path", ""), getattr(cfg, "num_hidden_layers", None),
            getattr(cfg, "hidden_size", None), getattr(cfg, "vocab_size", None), param.dtype, str(param.device),
            id(model) if not getattr(cfg, "_name_or_path", "") else 0)


@torch.inference_mode()
def forward_cost_curve(model, max_tokens: int, *, context: int = 64, repeats: int = 3) -> CostCurve:
    """Seconds of one cached forward of ``n`` new tokens (batch 1, after ``context`` tokens)
    for ``n`` on a grid up to ``max_tokens``: the median of ``repeats`` timed runs.

    Measured once per model/dtype/device and kept in memory; asking for a larger
    ``max_tokens`` later measures only the missing points.
    """
    from decodekit.cache import ModelState

    curve = _CURVES.setdefault(_model_key(model), CostCurve())
    todo = [n for n in _GRID if n < max_tokens and n not in curve.points]
    if max_tokens not in curve.points:
        todo.append(max_tokens)
    if not todo:
        return curve
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(4, vocab, (1, context), generator=gen)
    state, _ = ModelState.prefill(model, ctx)
    state.extend(ctx[:, :1])  # warm-up
    state.crop(1)
    for n in todo:
        tokens = torch.randint(4, vocab, (1, n), generator=gen)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state.extend(tokens)
            if state.ids.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            state.crop(n)
        curve.points[n] = statistics.median(times)
    return curve


def expected_tokens(k: int, a: float) -> float:
    """Expected tokens emitted by one verify step with ``k`` drafts, each accepted
    independently with probability ``a``: ``1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)``."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class CostPolicy(DraftPolicy):
    """Cost-aware draft length: maximise expected tokens per second.

    The model. One step with ``k`` drafts for a batch of ``B`` rows costs

        T(k) = t_target(B * (k + 1)) + k * t_draft(B)

    where ``t_target(n)`` is the measured time of one target forward with ``n`` new tokens
    (``forward_cost_curve``, batch 1; ``B`` rows of ``k + 1`` tokens go through the
    matmuls like ``B * (k + 1)`` tokens of one row) and ``t_draft(B)`` the drafter's cost of
    one drafting step (``Drafter.step_cost``: a forward of the draft model, ~0 for n-grams).
    If every draft is accepted independently with probability ``a``, the step emits
    ``E(k, a) = (1 - a^(k+1)) / (1 - a)`` tokens per row, so the policy picks

        k* = argmax_{k in {0} + [gamma_min, gamma_max]}  B * E(k, a) / T(k).

``k = 0`` (plain decoding, one token per target forward) is always a candidate, so the
policy stops speculating when speculation cannot pay (a slow or inaccurate drafter).

    On a CPU ``t_target(n)`` is nearly flat for small ``n`` (reading the weights dominates)
    and then grows linearly (compute dominates); the knee of that curve and ``a`` decide
    how long drafting pays. ``a`` is the maximum-likelihood estimate of the per-token
    acceptance of a truncated geometric: ``accepted / (accepted + rejections)`` where a
    rejection is a step that accepted fewer drafts than it drafted. The observed counts
    forget exponentially (``decay`` per step) so the estimate follows the text; a fixed
    prior of 2 accepted / 1 rejected is added, so after a stretch without drafting the
    estimate drifts back to 2/3 and the policy probes again. The cost curves are measured
    once per model/dtype/device (about a second).
    """

    name = "cost"

    def __init__(self, gamma_min: int, gamma_max: int, decay: float = 0.95):
        super().__init__(gamma_max)
        self.gamma_min, self.gamma_max, self.decay = gamma_min, gamma_max, decay
        self.accepted, self.rejected = 0.0, 0.0  # decayed observations
        self.curve: CostCurve | None = None
        self.drafter = None
        self.last_choice: int | None = None

    def start(self, req, drafter) -> None:
        self.drafter = drafter
        batch = req.input_ids.shape[0]
        self.curve = forward_cost_curve(req.model, batch * (self.gamma_max + 1))

    @property
    def acceptance(self) -> float:
        return (self.accepted + 2.0) / (self.accepted + self.rejected + 3.0)  # prior 2/3

    def tokens_per_second(self, k: int, batch: int) -> float:
        seconds = self.curve(batch * (k + 1)) + k * self.drafter.step_cost(batch)
        return batch * expected_tokens(k, self.acceptance) / max(seconds, 1e-9)

    def choose(self, rows: list[list[int]]) -> Tensor:
        batch = len(rows)
        ks = [0, *range(self.gamma_min, self.gamma_max + 1)]
        best = max(ks, key=lambda k: self.tokens_per_second(k, batch))
        self.last_choice = best
        return torch.full((batch,), best, dtype=torch.long)

    def observe(self, drafted: Tensor, accepted: Tensor) -> None:
        drafted, accepted = drafted.cpu(), accepted.cpu()
        self.accepted = self.decay * self.accepted + float(accepted.sum())
        self.rejected = self.decay * self.rejected + float((accepted < drafted).sum())


# ---------------------------------------------------------------------------- factory
POLICIES = ("fixed", "egag", "cost")


def make_policy(
    name: str = "fixed",
    *,
    gamma: int = 5,
    gamma_min: int = 1,
    gamma_max: int | None = None,
    egag_ema_beta: float = 0.0,
) -> DraftPolicy:
    """Validate the draft-length options and build the policy (``gamma_max`` None -> gamma)."""
    check_choice("draft_policy", name, POLICIES)
    check_int("gamma", gamma, min_value=1)
    check_int("gamma_min", gamma_min, min_value=1)
    if gamma_max is not None:
        check_int("gamma_max", gamma_max, min_value=1)
    top = gamma if gamma_max is None else gamma_max
    if gamma_min > top:
        raise DecodeKitError(
            f"gamma_min ({gamma_min}) must be <= gamma_max ({top}"
            f"{', which defaults to gamma' if gamma_max is None else ''})"
        )
    check_float("egag_ema_beta", egag_ema_beta)
    if not 0.0 <= egag_ema_beta < 1.0:
        raise DecodeKitError(f"egag_ema_beta must be in [0, 1), got {egag_ema_beta}")
    if name == "egag":
        return EgagPolicy(gamma_min, top, egag_ema_beta)
    if name == "cost":
        return CostPolicy(gamma_min, top)
    return FixedPolicy(gamma)
