"""Drafters that run a model, and the one place a drafter spec becomes a ``Drafter``.

``ModelDrafter``: a causal LM with the target's vocabulary (a separate draft model, or
``early_exit_model``: the target's first N layers). ``resolve_drafter`` turns what a user
writes (a model, ``"layers:N"``, ``"eagle"`` / ``"eagle:DIR"``, ``"X+prompt_lookup"``, a model
name or path) into a drafter for every caller: ``generate`` and the server alike. It sits
above the drafter modules (``eagle.py``, ``hybrid.py``), which never import it.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import Tensor, nn

from decodekit.cache import ModelState, left_pad
from decodekit.kvstate import backend_of
from decodekit.model_info import vocab_size
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.drafting import Draft, Drafter, chain_draft, draw_draft, maybe_compact
from decodekit.strategies.eagle import resolve_eagle
from decodekit.strategies.hybrid import HybridDrafter, split_hybrid
from decodekit.strategies.verify import VerifyResult
from decodekit.validation import DecodeKitError, check_int

__all__ = ["ModelDrafter", "early_exit_model", "is_eagle_spec", "resolve_drafter"]


class ModelDrafter(Drafter):
    """A causal LM with the target's vocabulary drafting autoregressively with its own cache.

    The drafter cache holds ``seen[b]`` tokens of row ``b``'s history. Tokens of the
    history it has not consumed (the whole prompt at first; later the target's
    recovered/bonus token, and the last accepted draft, which was sampled but never fed)
    are *pending*: the first draft forward feeds them all at once, right aligned with a
    token mask (left padding), and its logits give the first draft. Drafts ``1..k-1`` are fed to draw
    drafts ``2..k``; after verification the rejected ones are rolled back per row.
    """

    name = "model"

    def __init__(self, model):
        self.model = model
        self.memory = model.__dict__.setdefault("_decodekit_drafter_memory", {})
        self.state: ModelState | None = None
        self.seen: list[int] = []
        self.fed = 0  # drafts fed to the drafter in the last propose
        self._first: Tensor | None = None  # [B, V] logits for the first draft, if computed

    def prefill(self, req: DecodeRequest) -> None:
        """Lazy: the whole prompt is pending, so the first drafting forward prefills it (a
        policy that never drafts, e.g. ``cost`` with a slow drafter, never pays for it)."""
        self.req = req
        batch = req.input_ids.shape[0]
        self.state = ModelState.empty(self.model, batch, use_cache=req.use_cache)
        self.seen = [0] * batch
        self._first = None

    def first_logits(self, rows: list[list[int]]) -> Tensor:
        """Feed the pending tokens; logits ``[B, V]`` for the first draft (computed once)."""
        if self._first is not None and all(len(r) == s for r, s in zip(rows, self.seen)):
            return self._first
        pending = [r[s:] for r, s in zip(rows, self.seen)]
        tokens, mask = left_pad(pending, self.req.pad_token_id)  # right aligned, masked in front
        self._first = self.state.extend(tokens, token_mask=mask, logits_to_keep=1)[:, -1]
        self.seen = [len(r) for r in rows]
        return self._first

    def _draw(self, logits: Tensor, rows: list[list[int]] | None) -> tuple[Tensor, Tensor]:
        """``[B, V]`` logits -> ``q [B, V]`` and a draft ``[B]`` (``draw_draft``)."""
        return draw_draft(self.req, logits, rows)

    def _feed(self, x: Tensor, logits: Tensor) -> Tensor:
        """Draft ``x [B]`` into the drafter's cache -> logits ``[B, V]`` for the next draft."""
        return self.state.extend(x[:, None])[:, -1]

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        logits = self.first_logits(rows)  # [B, V]
        self._first = None
        self.proposed, q = chain_draft(self.req, rows, k, logits, self._draw, self._feed)  # [B, k], [B, k, V]
        self.fed = max(k - 1, 0)
        drafted = torch.full((len(rows),), k, dtype=torch.long, device=logits.device)
        return Draft(self.proposed, drafted, q)

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        """Keep the fed drafts that were accepted. The verified drafts may be another
        drafter's in some rows (a hybrid, ``strategies/hybrid.py``): only the prefix where
        ours agree with them is history; the rest is rolled back and fed later as pending."""
        kept = result.accepted.clamp(max=self.fed)  # [B] fed drafts that were accepted
        width = min(self.fed, draft.k)  # the verified draft may be narrower (trimmed)
        if width:
            ours = self.proposed[:, :width].to(draft.tokens.device)
            agree = (ours == draft.tokens[:, :width]).long().cumprod(-1).sum(-1)  # [B]
            kept = torch.minimum(kept, agree.to(kept.device))
        self.state.rollback(self.fed - kept)
        self.seen = [s + int(n) for s, n in zip(self.seen, kept.tolist())]
        self.fed = 0
        maybe_compact(self.state)

    def select_rows(self, index: Tensor) -> None:
        self.state.select_rows(index)
        self.seen = [self.seen[i] for i in index.tolist()]
        if self._first is not None:
            self._first = self._first.index_select(0, index.to(self._first.device))

    def add_rows(self, other: Drafter) -> None:
        """The joining rows' drafter state (usually nothing fed yet: their prompts are pending)
        comes after ours. First-draft logits computed for our rows but not used are dropped:
        their last token is rolled back and fed again with the joining rows' pending tokens."""
        if not isinstance(other, ModelDrafter) or other.model is not self.model:
            raise NotImplementedError("only a drafter of the same draft model can take rows")
        for drafter in (self, other):
            if drafter._first is not None:
                drafter.state.rollback(torch.ones(drafter.state.batch_size, dtype=torch.long))
                drafter.seen = [s - 1 for s in drafter.seen]
                drafter._first = None
        self.state.add_rows(other.state)
        self.seen += other.seen

    def step_cost(self, batch: int) -> float:
        """One draft forward of ``batch`` rows (one token each), measured at that batch size."""
        from decodekit.strategies.draft_policy import VerifyCost

        if getattr(self, "_cost", None) is None:
            self._cost = VerifyCost(self.model, 1)
        return self._cost(1, batch)


def early_exit_model(model, num_layers: int):
    """A view of ``model`` running only its first ``num_layers`` decoder layers, then its own
    final norm and LM head (self-speculative drafting). Shares every weight: no copy.
    """
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise DecodeKitError(
            f"drafter 'layers:N' needs a decoder with .model.layers; {type(model).__name__} has none"
        )
    check_int("drafter layers:N", num_layers, min_value=1, max_value=len(layers) - 1)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    short = copy.copy(decoder)
    short._modules = dict(decoder._modules)
    short._modules["layers"] = nn.ModuleList(list(layers)[:num_layers])
    short.config = config
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules["model"] = short
    view.config = config
    return view.eval()


# ---------------------------------------------------------------------------- specs
def _check_tokenizers(target_tok, draft_tok) -> None:
    if target_tok is None or draft_tok is None:
        return
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise DecodeKitError("drafter's tokenizer differs from the target's: speculation needs "
                             "the same vocabulary (same token ids)")


def is_eagle_spec(drafter) -> bool:
    """``"eagle"`` (the shipped head) or ``"eagle:DIR"`` (a head from ``train-drafter``)."""
    return isinstance(drafter, str) and (drafter.strip() == "eagle" or drafter.strip().startswith("eagle:"))


def resolve_drafter(drafter, req: DecodeRequest) -> Drafter:
    """``drafter``: a ``Drafter``, a causal LM, ``"layers:N"``, ``"eagle"`` / ``"eagle:DIR"``
    (a trained draft head, ``strategies/eagle/``) or a model spec for ``load_model``
    (bundled name, directory, .gguf). Checks vocabulary and device."""
    if isinstance(drafter, Drafter):
        return drafter
    if isinstance(drafter, str):
        if drafter.strip().endswith("+prompt_lookup"):  # prompt lookup where it matches, X elsewhere
            return _resolve_hybrid(drafter, req)
        match = re.fullmatch(r"layers:(\d+)", drafter.strip())
        if match:
            return ModelDrafter(early_exit_model(req.model, int(match.group(1))))
        if drafter.startswith("layers"):
            raise DecodeKitError(f"drafter {drafter!r}: write layers:N with N a number of layers")
        if is_eagle_spec(drafter):
            return resolve_eagle(drafter.strip(), req.model)
        from decodekit.models import load_model

        backend = backend_of(req.model)  # a llama.cpp target: the drafter runs there too
        dtype = next(req.model.parameters()).dtype if backend.in_torch else None
        model, tokenizer = load_model(drafter, dtype=dtype, device=str(req.model.device), param="drafter",
                                      backend=None if backend.in_torch else backend.name)
        _check_tokenizers(req.tokenizer, tokenizer)
        drafter = model
    if not isinstance(drafter, nn.Module) or not hasattr(drafter, "config"):
        raise DecodeKitError(
            f"drafter must be a causal LM, 'layers:N' or a model name/path; got {type(drafter).__name__}"
        )
    target_vocab, draft_vocab = vocab_size(req.model), vocab_size(drafter)
    if target_vocab != draft_vocab:
        raise DecodeKitError(
            f"drafter vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}): "
            "speculation needs the same tokenizer"
        )
    if drafter.device != req.model.device:
        raise DecodeKitError(f"drafter is on {drafter.device}, the target on {req.model.device}: "
                             "put both on the same device")
    drafter.eval()
    return ModelDrafter(drafter)


def _resolve_hybrid(spec: str, req: DecodeRequest) -> Drafter:
    """``"X+prompt_lookup"`` -> a ``HybridDrafter`` around drafter ``X`` (``strategies/hybrid.py``)."""
    base, _ = split_hybrid(spec)
    if not base.strip():
        raise DecodeKitError(f"drafter {spec!r}: a hybrid drafter is X+prompt_lookup with X one drafter "
                             "(layers:N, eagle, a model name or path)")
    return HybridDrafter(resolve_drafter(base.strip(), req))
