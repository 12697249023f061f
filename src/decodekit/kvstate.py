"""The KV-state interface every backend implements, and the registry that picks one per model.

A *KV state* holds, for a batch of ``B`` rows of one model, the tokens fed so far and the
model's key/value memory of them. Strategies only talk to this interface:

* ``ids``  ``[B, T]`` every token fed so far; ``mask`` ``[B, T]`` 1 for a real token, 0 for
  left padding or a *hole* (a rejected draft of one row while another row kept its column),
* ``extend(tokens)`` feeds ``[B, k]`` tokens and returns their logits,
* ``crop`` / ``rollback`` forget columns, ``select_rows`` / ``fork`` / ``add_rows`` move rows,
  ``compact`` removes holes, ``take_forwards`` hands out the count of model calls.

``KVState`` keeps that column bookkeeping, which is the same for every backend; a backend
subclasses it and adds its memory: ``decodekit.cache.ModelState`` a transformers KV cache (the
torch backend), ``decodekit.llamacpp.LlamaCppState`` llama.cpp's sequences. Which one a model
gets is decided by the model's type through ``register_backend`` (no attribute probing); a
model of an unregistered type runs on the torch backend. This module imports no transformers
code, so the llama.cpp path does not load transformers' cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Backend", "KVState", "TORCH_BACKEND", "backend_of", "register_backend"]


@dataclass(frozen=True)
class Backend:
    """Where a model runs, as far as decoding is concerned.

    ``state_class``: the ``KVState`` its states are (None: ``decodekit.cache.ModelState``);
    ``dtype_name``: the weight type a record names (``"llama.cpp:Q4_1"``; None: read the
    torch parameters); ``in_torch``: its weights are torch parameters (a drafter loaded for it
    takes their dtype, the forward-cost key reads them)."""

    name: str
    state_class: type[KVState] | None = None
    dtype_name: Callable[[object], str] | None = None
    in_torch: bool = True


TORCH_BACKEND = Backend("torch")
_BACKENDS: dict[type, Backend] = {}


def register_backend(model_type: type, backend: Backend) -> None:
    """Models of ``model_type`` (and its subclasses) run on ``backend``."""
    _BACKENDS[model_type] = backend


def backend_of(model) -> Backend:
    """The backend of ``model``: the one registered for its type, else the torch backend."""
    for kind in type(model).__mro__:
        if kind in _BACKENDS:
            return _BACKENDS[kind]
    return TORCH_BACKEND


class KVState:
    """Column bookkeeping shared by every backend (see module docstring). Subclasses implement
    ``empty``, ``extend`` and ``fork`` and extend the row/column operations with their memory."""

    def __init__(self, model, ids: Tensor, mask: Tensor):
        self.model = model
        self.ids = ids  # [B, T]
        self.mask = mask  # [B, T]
        # No padding and no holes anywhere: the model can take its plain causal path. Kept
        # as a flag (updated where the mask changes) so decoding needs no host sync for it.
        self.dense = bool(mask.all())
        self.forwards = 0  # model calls made through this state: THE count of forwards
        self.credited = 0  # of those, the ones already credited to rows (``take_forwards``)

    # ------------------------------------------------------------------ feeding tokens
    @classmethod
    def empty(cls, model, batch: int, *, use_cache: bool = True) -> KVState:
        raise NotImplementedError

    @classmethod
    def prefill(cls, model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                use_cache: bool = True, logits_to_keep: int = 1) -> tuple[KVState, Tensor]:
        """Run the prompt ``[B, T]``; return the state and logits ``[B, logits_to_keep, V]``."""
        input_ids = input_ids.to(model.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device=model.device, dtype=torch.long)
        state = cls.empty(model, input_ids.shape[0], use_cache=use_cache)
        logits = state.extend(input_ids, token_mask=attention_mask, logits_to_keep=logits_to_keep)
        return state, logits

    def extend(self, tokens: Tensor, *, token_mask: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Feed ``tokens [B, k]``; returns logits ``[B, k, V]`` (or the last ``logits_to_keep``)."""
        raise NotImplementedError

    def fork(self, index: Tensor | None = None) -> KVState:
        """An independent state holding rows ``index`` (all rows if None)."""
        raise NotImplementedError

    def take_forwards(self) -> int:
        """Forwards made since the last call: each model call is handed out once, so the
        statistics (``RowTracker.count_forwards``) read every forward from the state."""
        new = self.forwards - self.credited
        self.credited = self.forwards
        return new

    def positions(self, token_mask: Tensor) -> Tensor:
        """Position ids ``[B, k]`` for new tokens with mask ``[B, k]``, continuing the rows."""
        before = self.mask.sum(-1, keepdim=True)  # [B, 1] real tokens so far
        pos = before + token_mask.cumsum(-1) - 1
        return pos.clamp_min(0)

    def append_columns(self, tokens: Tensor, token_mask: Tensor) -> None:
        """Record one forward's ``tokens`` / ``token_mask`` ``[B, k]`` (a backend's ``extend``
        calls this once per model call)."""
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.cat([self.mask, token_mask], dim=1)
        self.forwards += 1

    # ------------------------------------------------------------------ rolling back
    @property
    def length(self) -> int:
        """Columns held (cache length), holes and padding included."""
        return self.ids.shape[1]

    def crop(self, num_tokens_to_discard: int) -> None:
        """Forget the last ``num_tokens_to_discard`` columns of every row."""
        if num_tokens_to_discard <= 0:
            return
        keep = self.length - num_tokens_to_discard
        self.ids = self.ids[:, :keep]
        self.mask = self.mask[:, :keep]
        if not self.dense:  # the masked columns may have been the cropped ones (unused drafts)
            self.dense = bool(self.mask.all())

    def rollback(self, per_row: Tensor) -> None:
        """Row ``b`` forgets its last ``per_row[b]`` columns (``per_row [B]`` ints >= 0).

        Columns that every row forgets are cropped; for the other rows the forgotten
        columns become holes (mask 0), which attention and positions then ignore.
        """
        per_row = per_row.to(self.ids.device)
        common = int(per_row.min())
        self.crop(common)
        extra = per_row - common  # [B]
        if int(extra.max()) == 0:
            return
        col = torch.arange(self.length, device=self.ids.device)  # [T]
        hole = col[None, :] >= (self.length - extra)[:, None]  # [B, T]
        self.mask = self.mask.masked_fill(hole, 0)
        self.dense = False

    # ------------------------------------------------------------------ rows
    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    def select_rows(self, index: Tensor) -> None:
        """Keep (and reorder) rows: ``index [B']`` of row numbers, in place."""
        index = index.to(self.ids.device)
        self.ids = self.ids.index_select(0, index)
        self.mask = self.mask.index_select(0, index)

    def add_rows(self, other: KVState) -> None:
        """Append the rows of ``other`` (a state of the same model, e.g. a freshly prefilled
        request) below this state's rows, in place: continuous batching. The shorter of the
        two is left padded to the common length (mask 0), so every row keeps its positions.
        ``other`` must not be used afterwards; its forwards not yet taken (``take_forwards``)
        move along, so take each side's first to credit its rows."""
        width = max(self.length, other.length)
        ids_a, mask_a = self.padded_columns(width)
        ids_b, mask_b = other.padded_columns(width)
        self.ids = torch.cat([ids_a, ids_b.to(ids_a.device)])  # [B + B', W]
        self.mask = torch.cat([mask_a, mask_b.to(mask_a.device)])  # [B + B', W]
        self.dense = bool(self.mask.all())
        self.forwards += other.forwards
        self.credited += other.credited

    def padded_columns(self, width: int) -> tuple[Tensor, Tensor]:
        """``ids, mask [B, width]``: this state's columns with ``width - length`` in front."""
        pad = width - self.length
        zeros = torch.zeros((self.batch_size, pad), dtype=torch.long, device=self.ids.device)
        return torch.cat([zeros, self.ids], dim=1), torch.cat([zeros, self.mask], dim=1)

    # ------------------------------------------------------------------ holes
    def compact(self) -> Tensor | None:
        """Remove holes: move each row's real tokens to the right (more left padding).

        Holes cost attention work; strategies that create many (batched speculation)
        call this now and then. Columns that are padding in every row are dropped. Returns
        the gather order ``[B, W]`` the columns moved by (None: nothing moved), which a
        backend applies to its memory."""
        real = self.mask.bool()  # [B, T]
        width = int(real.sum(-1).max())
        if width == self.length and bool(real[:, -width:].all()):
            return None
        # order: padding/holes first (stable), then real tokens in their original order
        order = torch.argsort(real.to(torch.int8), dim=-1, stable=True)[:, -width:]  # [B, W]
        self.ids = self.ids.gather(1, order)
        self.mask = self.mask.gather(1, order)
        self.dense = bool(self.mask.all())
        return order

    def holes_count_as_context(self) -> bool:
        """Whether holes in the memory change what the model attends to (a sliding window
        counts columns): then ``compact_holes`` compacts at once."""
        return False

    def compact_holes(self, holes_per_row: int) -> None:
        """Compact once holes exceed ``holes_per_row`` per row (they cost attention work),
        or at once where holes would count as context (sliding-window attention)."""
        limit = 0 if self.holes_count_as_context() else holes_per_row * self.batch_size
        if self.holes() > limit:
            self.compact()

    def holes(self) -> int:
        """Number of masked columns that sit after a real token (not left padding)."""
        started = self.mask.cumsum(-1) > 0
        return int((started & (self.mask == 0)).sum())
