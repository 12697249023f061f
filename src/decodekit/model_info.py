"""Facts about a causal LM that decoding needs: vocabulary size, context length, EOS/pad ids.

One place for them, used by the front door (``api``), the strategies and the seed
adapters alike. Each reads the model object only (no tokenizer, no forward pass).
"""

from __future__ import annotations

__all__ = ["vocab_size", "context_length", "default_eos_pad", "pad_id"]


def _text_config(model):
    """The text part of the model's config (multimodal configs nest it)."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def vocab_size(model) -> int | None:
    """Rows of the output embedding (the logits' width ``V``), else ``config.vocab_size``."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return getattr(_text_config(model), "vocab_size", None)


def context_length(model) -> int | None:
    """``max_position_embeddings`` of the text config (None when the config has none)."""
    return getattr(_text_config(model), "max_position_embeddings", None)


def default_eos_pad(model) -> tuple[object, int | None]:
    """``(eos, pad)`` from the model's generation config. ``eos`` is as stored (an id, a
    list of ids or None); ``pad`` falls back to the (first) EOS id, else None."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    return eos, pad


def pad_id(model, pad_token_id: int | None = None) -> int:
    """The pad id to use: the one given, else the model's default (pad, else EOS), else 0."""
    if pad_token_id is not None:
        return pad_token_id
    default = default_eos_pad(model)[1]
    return 0 if default is None else default
