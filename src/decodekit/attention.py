"""The attention ``load_model`` gives torch models: transformers' SDPA attention, except that a
forward of several new tokens per row on a grouped-query model (a verify forward) hands the
key/value heads to SDPA as they are (``enable_gqa``) instead of copying each one for every query
head of its group.

transformers copies them (``repeat_kv``) whenever a mask is passed and more than one token is
new: for the bundled model (9 query heads on 3 key/value heads, 30 layers) that is 36 MB of
float32 copies per verify forward at a 260-token context, which a one-token forward never pays
(transformers packs the group into the query instead). Same mathematics, same SDPA kernel.
Anything else (one new token, no mask, soft-capping, attention biases) goes to transformers'
own SDPA function unchanged.
"""

from __future__ import annotations

from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["ATTENTION", "gqa_sdpa_attention", "use_gqa_attention"]

ATTENTION = "decodekit_gqa_sdpa"  # the name registered with transformers


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query [B, H, q, D], key/value
    [B, Hkv, L, D], attention_mask [B, 1, q, L] (bool or additive) -> ([B, q, H, D], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
    extras = any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux"))
    if groups == 1 or query.shape[2] == 1 or not plain or extras or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    mask = attention_mask[:, :, :, : key.shape[-2]]  # [B, 1, q, L]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)  # [B, H, q, D]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, gqa_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA gets


def use_gqa_attention(model) -> None:
    """Switch a transformers model that runs SDPA attention to ``gqa_sdpa_attention``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    _register()
    model.set_attn_implementation(ATTENTION)
