"""The one layer every strategy uses to call a model and manage its KV cache.

``ModelState`` holds, for a batch of ``B`` rows of one model:

* ``ids``   ``[B, T]`` every token fed so far (prompt, then generated/drafted tokens),
* ``mask``  ``[B, T]`` 1 for a real token, 0 for left padding or a *hole* (a rejected
  draft token of one row while another row of the batch kept its token at that column),
* ``cache`` a transformers ``DynamicCache`` whose length is ``T`` (when ``use_cache``).

Position ids are always derived from the mask (``#real tokens before``), so left padding
and holes never shift RoPE positions. The operations are the ones decoding needs:

* ``prefill`` / ``extend(tokens)`` – feed tokens, get their logits,
* ``crop(n)`` – drop the last ``n`` columns for every row (rollback),
* ``rollback(per_row)`` – ragged rollback: row ``b`` forgets its last ``per_row[b]``
  tokens; columns no row needs are cropped, the rest become holes,
* ``select_rows(idx)`` – keep/reorder rows (finished rows leave, beams are reordered),
* ``fork(idx)`` – an independent copy of some rows (EIS rollouts), the original untouched,
* ``add_rows(other)`` – rows of another state (a request prefilled on its own) join the
  batch, the shorter side left padded (continuous batching: ``decodekit.serve``).

With ``use_cache=False`` the same API re-runs the whole sequence on every call (the
seed's slow path, kept for teaching and for checking the cached path against it).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers import DynamicCache

from decodekit.kvstate import KVState, backend_of

__all__ = ["ModelState", "prune_cache", "left_pad", "cache_kwarg", "uses_sliding_window"]


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Lists of token ids -> left-padded ``ids [B, T]`` and ``mask [B, T]`` (T >= 1; an
    empty row is all padding)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row) :] = 1
    return ids, mask


def prune_cache(cache, num_tokens_to_discard: int):
    """Remove the last ``num_tokens_to_discard`` tokens from a KV cache.

    Works on a transformers ``Cache`` (transformers 5.x ``crop`` takes a *negative* count)
    and on the legacy tuple-of-(key, value) form ``[B, H, T, D]``. 0 discards nothing.
    """
    if num_tokens_to_discard < 0:
        raise ValueError(f"num_tokens_to_discard must be >= 0, got {num_tokens_to_discard}")
    if cache is None or num_tokens_to_discard == 0:
        return cache
    if hasattr(cache, "crop"):
        cache.crop(-num_tokens_to_discard)
        return cache
    return tuple(
        tuple(t[..., :-num_tokens_to_discard, :] for t in layer) for layer in cache
    )


def uses_sliding_window(model) -> bool:
    """Whether some attention layer of ``model`` uses a sliding window.

    Sliding-window attention counts cache *columns*, holes included, so for such models
    holes must be compacted away as soon as they appear (see ``ModelState.compact_holes``).
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "sliding_window", None) is None:
        return False
    types = getattr(cfg, "layer_types", None)
    return types is None or any("sliding" in t for t in types)


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward``: transformers renamed
    ``past_key_values`` to ``cache`` during 5.x; support both."""
    name = getattr(model, "_decodekit_cache_kwarg", None)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        try:
            model._decodekit_cache_kwarg = name
        except AttributeError:  # pragma: no cover - exotic modules
            pass
    return name


def _cache_from_tensors(kv: list[tuple[Tensor, Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(kv):
        cache.update(k, v, layer_idx)
    return cache


def _cache_tensors(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _join_caches(top: list[tuple[Tensor, Tensor]], bottom: list[tuple[Tensor, Tensor]]):
    """Per layer keys/values of two equally long caches, stacked along the batch."""
    if not top or not bottom:
        return top or bottom
    return [(torch.cat([k1, k2.to(k1.device)]), torch.cat([v1, v2.to(v1.device)]))
            for (k1, v1), (k2, v2) in zip(top, bottom, strict=True)]


class ModelState(KVState):
    """Batched decoding state of one torch model: ``KVState``'s columns plus a transformers
    KV cache (see module docstring). The torch backend's ``KVState``."""

    def __init__(self, model, ids: Tensor, mask: Tensor, cache: DynamicCache | None, use_cache: bool):
        super().__init__(model, ids, mask)
        self.cache = cache
        self.use_cache = use_cache

    # ------------------------------------------------------------------ feeding tokens
    @classmethod
    def empty(cls, model, batch: int, *, use_cache: bool = True) -> KVState:
        """A state of ``batch`` rows holding nothing yet (``ids``/``mask`` ``[B, 0]``): of the
        backend registered for the model's type (``decodekit.kvstate.register_backend``)."""
        own = backend_of(model).state_class
        if own is not None and not issubclass(cls, own):
            return own.empty(model, batch, use_cache=use_cache)
        ids = torch.zeros((batch, 0), dtype=torch.long, device=model.device)
        return cls(model, ids, ids.clone(), DynamicCache() if use_cache else None, use_cache)

    def extend(self, tokens: Tensor, *, token_mask: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Feed ``tokens [B, k]``; returns logits ``[B, k, V]`` (or the last ``logits_to_keep``)."""
        tokens = tokens.to(self.ids.device)
        if token_mask is None:
            token_mask = torch.ones_like(tokens)
        else:
            self.dense = self.dense and bool(token_mask.all())
        positions = self.positions(token_mask)
        self.append_columns(tokens, token_mask)
        if self.use_cache:
            mask = None if self.dense else self.mask  # dense: plain causal path (cheaper)
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **{cache_kwarg(self.model): self.cache},
            )
            return out.logits
        # No cache: re-run the whole sequence, keep the logits of the new tokens.
        all_pos = (self.mask.cumsum(-1) - 1).clamp_min(0)
        keep = logits_to_keep if logits_to_keep else tokens.shape[1]
        out = self.model(
            input_ids=self.ids, attention_mask=self.mask, position_ids=all_pos, use_cache=False,
            logits_to_keep=keep,
        )
        return out.logits

    # ------------------------------------------------------------------ rolling back
    def crop(self, num_tokens_to_discard: int) -> None:
        """Forget the last ``num_tokens_to_discard`` columns of every row."""
        if num_tokens_to_discard <= 0:
            return
        super().crop(num_tokens_to_discard)
        if self.use_cache:
            prune_cache(self.cache, num_tokens_to_discard)

    # ------------------------------------------------------------------ rows
    def select_rows(self, index: Tensor) -> None:
        """Keep (and reorder) rows: ``index [B']`` of row numbers, in place."""
        index = index.to(self.ids.device)
        super().select_rows(index)
        if self.use_cache and self.length:
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys.index_select(0, index)
                    layer.values = layer.values.index_select(0, index)

    def fork(self, index: Tensor | None = None) -> ModelState:
        """An independent state holding rows ``index`` (all rows if None), e.g. expanded
        ``repeat_interleave`` rows for rollouts; later calls on it never touch ``self``.
        Forwards of ``self`` not yet taken (``take_forwards``) move to the fork, so a strategy
        that goes on with the fork (EIS) loses none of them."""
        if index is None:
            index = torch.arange(self.batch_size, device=self.ids.device)
        index = index.to(self.ids.device)
        cache = None
        if self.use_cache:
            cache = _cache_from_tensors(
                [(k.index_select(0, index), v.index_select(0, index)) for k, v in _cache_tensors(self.cache)]
            )
        fork = ModelState(self.model, self.ids.index_select(0, index), self.mask.index_select(0, index), cache,
                          self.use_cache)
        fork.forwards = self.take_forwards()
        return fork

    def add_rows(self, other: ModelState) -> None:
        """``KVState.add_rows``; the shorter side's cache is left padded with zero keys/values."""
        if not isinstance(other, ModelState) or other.use_cache != self.use_cache or other.model is not self.model:
            raise ValueError("add_rows needs a state of the same model and the same use_cache")
        width = max(self.length, other.length)
        kv = None
        if self.use_cache:
            kv = _join_caches(self._padded_kv(width, other), other._padded_kv(width, self))
        super().add_rows(other)
        if kv is not None:
            self.cache = _cache_from_tensors(kv) if kv else DynamicCache()

    def _padded_kv(self, width: int, like: ModelState) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(keys, values) [B, H, width, D]``, left padded with zeros; a state that
        holds nothing yet takes its shapes from ``like`` (empty list if neither holds a column)."""
        layers = _cache_tensors(self.cache) if self.length else []
        if not layers:
            if not like.length:
                return []
            return [(k.new_zeros((self.batch_size, k.shape[1], width, k.shape[3])),
                     v.new_zeros((self.batch_size, v.shape[1], width, v.shape[3])))
                    for k, v in _cache_tensors(like.cache)]
        pad = width - self.length
        return [(torch.nn.functional.pad(k, (0, 0, pad, 0)), torch.nn.functional.pad(v, (0, 0, pad, 0)))
                for k, v in layers]

    # ------------------------------------------------------------------ holes
    def compact(self) -> Tensor | None:
        """``KVState.compact``; the cache's columns move with the tokens."""
        order = super().compact()
        if order is None or not self.use_cache:
            return order
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or not layer.keys.numel():
                continue
            idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, idx)
        return order

    def holes_count_as_context(self) -> bool:
        """Sliding-window attention counts cache columns, holes included."""
        return uses_sliding_window(self.model)
