"""Verification of drafted tokens: the one rejection sampler every speculative strategy uses.

Vocabulary (as in vLLM): the drafter proposes ``drafted`` tokens; the target *accepts* a
prefix of them; at the first rejection it emits a *recovered* token drawn from the
residual distribution; when every draft is accepted it emits a *bonus* token from its
own distribution at the next position. Each verify step therefore yields
``accepted + 1`` tokens.

Lossless rule (Leviathan et al. 2023, Chen et al. 2023): draft ``x`` drawn from ``q`` is
accepted with probability ``min(1, p(x) / q(x))``; on rejection the token is drawn from
``max_fn(p - q) = relu(p - q) / sum(relu(p - q))``. The output is then distributed exactly
as the target's ``p``.

Deterministic drafters (n-grams, prompt lookup) are the special case ``q = one_hot(x)``:
accept with probability ``p(x)``, on rejection draw from ``p`` with ``x`` removed and
renormalised. Passing ``q=None`` selects that case without building one-hot tensors.

Under greedy decoding ``p`` is one-hot on the target's argmax, so a draft is accepted
exactly when it equals the argmax and the recovered token is the argmax: the output is
token-identical to greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["max_fn", "verify", "VerifyResult"]


def max_fn(x: Tensor, fallback: Tensor | None = None) -> Tensor:
    """``relu(x) / sum(relu(x))`` over the last dim, never NaN.

    A row whose positive part sums to 0 (``p - q`` with ``p == q``) has no residual; it
    becomes ``fallback`` (same shape as ``x``) or, without one, the uniform distribution.
    """
    pos = torch.clamp(x, min=0.0)
    total = pos.sum(dim=-1, keepdim=True)
    if fallback is None:
        fallback = torch.full_like(pos, 1.0 / pos.shape[-1])
    return torch.where(total > 0, pos / total.clamp_min(1e-30), fallback)


@dataclass
class VerifyResult:
    accepted: Tensor  # [B] number of drafts accepted per row (0..drafted[b])
    next_tokens: Tensor  # [B] the recovered (after a rejection) or bonus token per row

    @property
    def emitted(self) -> Tensor:
        """[B] tokens produced by this verify step: accepted drafts + 1."""
        return self.accepted + 1


def _draw(probs: Tensor, greedy: bool | Tensor, generator: torch.Generator | None) -> Tensor:
    """``[N, V]`` -> ``[N]``: the argmax of greedy rows, a draw for the others (``greedy``: one
    bool for every row or ``[N]`` per row; a draw costs ~1 ms a row over a 49k vocabulary)."""
    if isinstance(greedy, bool):
        if greedy:
            return probs.argmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    out = probs.argmax(dim=-1)  # [N]
    sampled = ~greedy
    if bool(sampled.any()):
        out[sampled] = torch.multinomial(probs[sampled], 1, generator=generator).squeeze(-1)
    return out


def verify(
    p: Tensor,
    draft_tokens: Tensor,
    drafted: Tensor,
    q: Tensor | None = None,
    *,
    greedy: bool | Tensor = False,
    generator: torch.Generator | None = None,
    skip_sample_adjustment: bool = False,
) -> VerifyResult:
    """Accept a prefix of each row's drafts and pick the row's next token.

    Args:
        p: ``[B, k+1, V]`` target probabilities (processed exactly like ``q``); position
            ``i`` is the target's distribution for draft ``i``, position ``k`` the bonus.
        draft_tokens: ``[B, k]`` drafted ids (entries past ``drafted[b]`` are ignored).
        drafted: ``[B]`` how many drafts row ``b`` really has (``0..k``).
        q: ``[B, k, V]`` drafter probabilities, or None for deterministic drafts.
        greedy: the processor is greedy (argmax instead of random draws); a ``[B]`` bool
            tensor when only some rows are (a serving batch mixing greedy and sampled rows).
        skip_sample_adjustment: on rejection draw from ``p`` instead of the residual.
            Faster to reason about, but LOSSY: the output no longer follows ``p``.
    """
    bsz, k = draft_tokens.shape
    device = p.device
    greedy = greedy.to(device) if isinstance(greedy, Tensor) else bool(greedy)  # [B] or one for all
    drafted = drafted.to(device)
    idx = draft_tokens.clamp_min(0)[..., None]  # [B, k, 1]
    p_x = p[:, :k].gather(-1, idx).squeeze(-1)  # [B, k]
    if greedy is True:
        accept = p_x > 0.5  # one-hot p: draft equals the argmax
    else:
        q_x = q.gather(-1, idx).squeeze(-1) if q is not None else torch.ones_like(p_x)
        ratio = p_x / q_x.clamp_min(1e-30)
        u = torch.rand(p_x.shape, device=device, generator=generator)
        accept = u < ratio.clamp(max=1.0)
        if isinstance(greedy, Tensor):
            accept = torch.where(greedy[:, None], p_x > 0.5, accept)
    in_draft = torch.arange(k, device=device)[None, :] < drafted[:, None]  # [B, k]
    accepted = torch.cumprod((accept & in_draft).to(torch.long), dim=-1).sum(-1)  # [B]

    rows = torch.arange(bsz, device=device)
    p_next = p[rows, accepted]  # [B, V] target distribution at the first unaccepted position
    rejected = accepted < drafted  # [B]
    if greedy is True or skip_sample_adjustment or not bool(rejected.any()):
        return VerifyResult(accepted, _draw(p_next, greedy, generator))

    # Residual distribution at the rejected position.
    pos = accepted.clamp(max=k - 1)
    if q is not None:
        residual = p_next - q[rows, pos]
    else:
        residual = p_next.clone()
        residual[rows, draft_tokens[rows, pos].clamp_min(0)] = 0.0  # p with x removed
    # p == q (or p concentrated on x) gives a zero residual; rejection then has
    # probability 0, so any fallback is exact in distribution: use p itself.
    residual = max_fn(residual, fallback=p_next)
    dist = torch.where(rejected[:, None], residual, p_next)
    return VerifyResult(accepted, _draw(dist, greedy, generator))
