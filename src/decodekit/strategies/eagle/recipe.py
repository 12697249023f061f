"""The head's training objective and its held-out measure, both on unrolled drafts.

A drafting step after a verify feeds the head the target's true features up to position
``t``, then its own predicted features for each further draft. ``unroll`` computes that for
every start ``t`` of a batch at once (EAGLE-3's "training-time test"): depth ``d`` is one head
forward over ``L`` queries whose keys are the true pairs ``j <= t`` (depth 1's columns) and the
depth-``2..d`` columns of the same start ``t`` (a block-diagonal mask), through one KV cache, so
depth ``d`` costs one ``L``-token forward, not ``d``.

- ``loss``: per depth, cross-entropy of the head's token against the target's greedy token
  and (``distill``) against the target's top-k distribution; smooth L1 on depth 1's features
  (scaled by each dimension's std), as EAGLE.
- ``acceptance``: per depth ``d``, the share of starts whose draft ``d`` equals the target's
  greedy token among those whose drafts ``1..d-1`` did: greedy speculative decoding's
  acceptance by depth, measured teacher-forced on held-out answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from decodekit.strategies.eagle.head import EagleHead

__all__ = ["Recipe", "make_batch", "unroll", "loss", "acceptance", "expected_accepted"]


@dataclass
class Recipe:
    """The training objective's knobs (``TrainConfig`` carries them)."""

    depth: int = 3  # unrolled draft steps per position (1: EAGLE-1's teacher forcing only)
    distill: float = 0.5  # weight of the top-k distribution's cross-entropy (0: greedy tokens only)
    feature_weight: float = 1.0  # weight of the depth-1 feature regression
    depth_decay: float = 0.8  # depth d's token loss weighs depth_decay ** (d - 1)
    noise: float = 0.1  # uniform noise on the input features, x each dimension's std


def make_batch(samples: list[dict], vocab_map: Tensor | None) -> dict:
    """Sequences -> right-padded tensors of training pairs ``t = 0 .. L-3``: ``feats_in [n, L, H]``
    (f_t), ``feats_out`` (f_{t+1}), ``tokens [n, L]`` (x_{t+1}), ``labels [n, L]`` (the target's
    greedy x_{t+2}; -1 at prompt and padding positions, -2 outside the draft vocabulary),
    ``top_ids`` / ``top_p [n, L, K]`` and ``mask [n, L]``."""
    length = max(s["tokens"].shape[0] - 2 for s in samples)
    hidden, k = samples[0]["features"].shape[1], samples[0]["top_ids"].shape[1]
    n = len(samples)
    out = dict(feats_in=torch.zeros(n, length, hidden), feats_out=torch.zeros(n, length, hidden),
               tokens=torch.zeros(n, length, dtype=torch.long), labels=torch.full((n, length), -1, dtype=torch.long),
               top_ids=torch.zeros(n, length, k, dtype=torch.long), top_p=torch.zeros(n, length, k),
               mask=torch.zeros(n, length, dtype=torch.long))
    for i, s in enumerate(samples):
        m = s["tokens"].shape[0] - 2
        out["feats_in"][i, :m], out["feats_out"][i, :m] = s["features"][:m], s["features"][1: m + 1]
        out["tokens"][i, :m], out["labels"][i, :m], out["mask"][i, :m] = s["tokens"][1: m + 1], s["greedy"][1: m + 1], 1
        out["top_ids"][i, :m], out["top_p"][i, :m] = s["top_ids"][1: m + 1], s["top_p"][1: m + 1].float()
    if vocab_map is not None:  # full id -> draft-vocabulary index (-2 outside it)
        labels = out["labels"]
        out["labels"] = torch.where(labels >= 0, vocab_map[labels.clamp_min(0)], labels)
        out["top_ids"] = vocab_map[out["top_ids"]]
    return out


def _block_mask(mask: Tensor, depth: int, dtype: torch.dtype) -> Tensor:
    """``mask [B, L]`` -> additive ``[B, 1, L, depth*L]``: query ``t`` of block ``depth`` sees
    block 1's keys ``j <= t`` (real ones) and key ``t`` of blocks ``2..depth``."""
    b, length = mask.shape
    idx = torch.arange(length, device=mask.device)
    first = (idx[None, :] <= idx[:, None])[None] & mask.bool()[:, None, :]  # [B, L, L]
    diag = torch.eye(length, dtype=torch.bool, device=mask.device).expand(b, length, length)
    allowed = torch.cat([first] + [diag] * (depth - 1), dim=-1)  # [B, L, depth*L]
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def unroll(head: EagleHead, batch: dict, depth: int, noise: Tensor | None = None) -> list[Tensor]:
    """Predicted features ``[B, L, H]`` per depth ``d = 1..depth``: entry ``t`` of depth ``d``
    predicts ``f_{t+d}`` from the true pairs up to ``t`` and the head's own ``d - 1`` further
    predictions fed with the true tokens ``x_{t+2} ..`` (the drafts a greedy verify accepted)."""
    from transformers import DynamicCache

    mask, tokens = batch["mask"], batch["tokens"]  # [B, L]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, L]
    feats = batch["feats_in"] if noise is None else batch["feats_in"] + noise
    cache = DynamicCache(config=head.config)
    dtype = head.fc.weight.dtype
    preds = []
    for d in range(1, depth + 1):
        if d > 1:  # block d's pair t: (depth d-1's prediction at t, x_{t+d}), at position t + d - 1
            feats = preds[-1]
            tokens = nn.functional.pad(tokens[:, 1:], (0, 1))
        preds.append(head(feats, tokens, positions + d - 1, _block_mask(mask, d, dtype), cache))
    return preds


def _shift(x: Tensor, d: int, fill: float) -> Tensor:
    """``x [B, L, ...]`` shifted left by ``d - 1`` along L (depth d's entry t reads t + d - 1)."""
    if d == 1:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, d - 1]
    return nn.functional.pad(x[:, d - 1:], pad, value=fill)


def _token_loss(logits: Tensor, labels: Tensor, top_ids: Tensor, top_p: Tensor, distill: float) -> Tensor:
    """``logits [N, V']``, ``labels [N]``, ``top_ids / top_p [N, K]`` -> mean token loss."""
    logp = logits.float().log_softmax(-1)  # [N, V']
    hard = nn.functional.nll_loss(logp, labels, ignore_index=-2)
    if distill == 0:
        return hard
    inside = top_ids >= 0  # [N, K] in the draft vocabulary
    p = top_p * inside
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-6)
    soft = -(p * logp.gather(-1, top_ids.clamp_min(0))).sum(-1).mean()
    return (1 - distill) * hard + distill * soft


def loss(head: EagleHead, batch: dict, scale: Tensor, recipe: Recipe) -> tuple[Tensor, dict]:
    """The training loss of one batch (see the module doc) and its parts: ``reg``, ``ce``,
    ``acc`` (depth-1 token accuracy)."""
    b = {k: v.to(head.device) for k, v in batch.items()}
    noise = None
    if head.training and recipe.noise:
        noise = recipe.noise * scale * (2 * torch.rand_like(b["feats_in"]) - 1)
    preds = unroll(head, b, recipe.depth, noise)
    trained = b["labels"] != -1  # [B, L] generated positions
    reg = nn.functional.smooth_l1_loss(((preds[0] - b["feats_out"]) / scale)[trained],
                                       torch.zeros_like(preds[0][trained]))
    total, weights, info = recipe.feature_weight * reg, 0.0, dict(reg=float(reg.detach()))
    for d, pred in enumerate(preds, start=1):
        labels = _shift(b["labels"], d, -1)
        keep = labels != -1
        if not bool(keep.any()):
            continue
        logits = head.logits(pred[keep])
        ce = _token_loss(logits, labels[keep], _shift(b["top_ids"], d, 0)[keep], _shift(b["top_p"], d, 0)[keep],
                         recipe.distill)
        total = total + recipe.depth_decay ** (d - 1) * ce
        weights += recipe.depth_decay ** (d - 1)
        if d == 1:
            info.update(ce=float(ce.detach()), acc=float((logits.argmax(-1) == labels[keep]).float().mean()))
    return total, info


@torch.no_grad()
def acceptance(head: EagleHead, samples: list[dict], depth: int, vocab_map: Tensor | None = None,
               batch_size: int = 16) -> list[float]:
    """Greedy acceptance by draft depth on ``samples`` (the target's greedy answers), see the
    module doc: ``rates[d-1]`` = P(draft d right | drafts 1..d-1 right)."""
    was_training = head.training
    head.eval()
    right = torch.zeros(depth)
    reached = torch.zeros(depth)
    for i in range(0, len(samples), batch_size):
        b = {k: v.to(head.device) for k, v in make_batch(samples[i: i + batch_size], vocab_map).items()}
        b["feats_in"] = b["feats_in"].to(head.fc.weight.dtype)
        chain = b["labels"] != -1  # [B, L] starts still accepted
        for d, pred in enumerate(unroll(head, b, depth), start=1):
            labels = _shift(b["labels"], d, -1)
            chain &= labels != -1
            hit = head.logits(pred).argmax(-1) == labels
            reached[d - 1] += chain.sum()
            chain &= hit
            right[d - 1] += chain.sum()
    head.train(was_training)
    return [round(float(r / n), 4) if n else 0.0 for r, n in zip(right, reached)]


@torch.no_grad()
def topk_hits(head: EagleHead, samples: list[dict], ks: tuple[int, ...], vocab_map: Tensor | None = None,
              batch_size: int = 16) -> list[float]:
    """P(the target's next token is among the head's ``k`` likeliest first drafts), for each
    ``k`` of ``ks``, teacher-forced on ``samples``: what a tree of ``k`` siblings at the first
    depth (EAGLE-2) could accept there; ``k = 1`` is depth-1 acceptance."""
    was_training = head.training
    head.eval()
    hits, total = torch.zeros(len(ks)), 0
    for i in range(0, len(samples), batch_size):
        b = {k: v.to(head.device) for k, v in make_batch(samples[i: i + batch_size], vocab_map).items()}
        b["feats_in"] = b["feats_in"].to(head.fc.weight.dtype)
        labels = _shift(b["labels"], 1, -1)  # [B, L]
        keep = (b["labels"] != -1) & (labels != -1)
        top = head.logits(unroll(head, b, 1)[0]).topk(max(ks), dim=-1).indices  # [B, L, max k]
        for j, k in enumerate(ks):
            hits[j] += (top[..., :k] == labels[..., None]).any(-1)[keep].sum()
        total += int(keep.sum())
    head.train(was_training)
    return [round(float(h / total), 4) if total else 0.0 for h in hits]


def expected_accepted(rates: list[float], gamma: int = 5) -> float:
    """Mean accepted drafts per verify of a chain of ``gamma`` drafts with these per-depth rates."""
    total, alive = 0.0, 1.0
    for r in rates[:gamma]:
        alive *= r
        total += alive
    return round(total, 4)
