"""The EAGLE head (a module of the target's own architecture) and the target's parts it reads.

See ``decodekit.strategies.eagle`` for the method. ``capture_hidden`` / ``take_hidden`` keep the
hidden states of the target's latest forward (a pre-hook on its final norm); ``HeadModel``
wraps the head as a causal "LM" so ``ModelState`` can drive it.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from decodekit.model_info import vocab_size
from decodekit.quant import QuantLinear, quantize_model
from decodekit.validation import DecodeKitError

__all__ = ["EagleHead", "HeadModel", "additive_mask", "capture_hidden", "take_hidden", "target_fingerprint",
           "decoder_of"]


# ---------------------------------------------------------------------------- the target's parts
def decoder_of(target):
    """The target's decoder (``.model`` with ``.layers``, ``.norm``, ``.embed_tokens``)."""
    decoder = getattr(target, "model", None)
    parts = ("layers", "norm", "embed_tokens", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, p) for p in parts):
        raise DecodeKitError(f"drafter 'eagle' needs a Llama-style decoder (.model.layers/.norm/.rotary_emb); "
                             f"{type(target).__name__} has none")
    return decoder


def target_fingerprint(target) -> dict:
    """Facts that identify a target cheaply (checked when a head is loaded)."""
    cfg = target.config
    embed = decoder_of(target).embed_tokens.weight.detach()  # no autograd warning while training
    return dict(model_type=cfg.model_type, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                vocab_size=vocab_size(target), embed_checksum=round(float(embed[:64].float().abs().sum()), 3))


class _Shared:
    """The target's frozen parts the head uses (held outside the head's parameters: never saved)."""

    def __init__(self, target, vocab_ids: Tensor | None):
        decoder = decoder_of(target)
        self.embed, self.norm, self.rotary = decoder.embed_tokens, decoder.norm, decoder.rotary_emb
        weight = float_weight(target.get_output_embeddings()).to(self.embed.weight.dtype)  # [V, H]
        self.vocab = weight.shape[0]
        self.lm_rows = weight if vocab_ids is None else weight.index_select(0, vocab_ids)
        self.lm_int8: QuantLinear | None = None  # EagleHead.quantize_int8


def float_weight(linear: nn.Module) -> Tensor:
    """A Linear's float weight ``[N, K]``: an int8/int4 ``QuantLinear``'s is the one its kernel
    multiplies by (so a head drafts for a quantized target with the target's own LM head)."""
    if isinstance(linear, QuantLinear):
        return linear.dequantize()
    if not linear.weight.is_floating_point():
        raise DecodeKitError(f"drafter 'eagle' needs a float or decodekit-quantized LM head, not "
                             f"{type(linear).__name__} with {linear.weight.dtype} weights")
    return linear.weight.detach()


def float_state(layer: nn.Module) -> dict[str, Tensor]:
    """``layer``'s state dict with each ``QuantLinear`` as a float ``weight`` (and its bias): what
    a plain layer of the same architecture loads."""
    state = dict(layer.state_dict())
    for name, child in layer.named_modules():
        if isinstance(child, QuantLinear):
            prefix = f"{name}." if name else ""
            state.pop(prefix + "scales")
            state[prefix + "weight"] = child.dequantize()
    return state


# ---------------------------------------------------------------------------- the head
class EagleHead(nn.Module):
    """fc(concat(f_t, embed(x_{t+1}))) -> one decoder layer -> predicted ``f_{t+1}``.

    ``vocab_ids [N]`` (a buffer, saved): the draft vocabulary; None = the full vocabulary.
    """

    def __init__(self, target, vocab_ids: Tensor | None = None):
        super().__init__()
        decoder = decoder_of(target)
        config = copy.deepcopy(target.config)
        config.num_hidden_layers = 1
        config._attn_implementation = "sdpa"
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[-1]]
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = type(decoder.layers[0])(config, layer_idx=0)
        self.layer.load_state_dict(float_state(decoder.layers[-1]))  # start from the target's last layer
        if vocab_ids is not None:
            self.register_buffer("vocab_ids", vocab_ids.to(torch.long))
        else:
            self.vocab_ids = None
        self.to(device=target.device, dtype=decoder.embed_tokens.weight.dtype)
        self.shared = _Shared(target, self.vocab_ids)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def cast(self, dtype: torch.dtype) -> EagleHead:
        """The head's weights and its LM-head rows in ``dtype`` (training runs in float32)."""
        self.to(dtype)
        self.shared.lm_rows = self.shared.lm_rows.to(dtype)
        return self

    def forward(self, features: Tensor, tokens: Tensor, position_ids: Tensor, attention_mask: Tensor,
                cache=None) -> Tensor:
        """``features [B, k, H]`` (f_t), ``tokens [B, k]`` (x_{t+1}), ``attention_mask``
        ``[B, 1, k, K]`` additive -> predicted features ``[B, k, H]`` (f_{t+1}, pre-norm)."""
        x = torch.cat([features.to(self.fc.weight.dtype), self.shared.embed(tokens)], dim=-1)
        x = self.fc(x)
        cos_sin = self.shared.rotary(x, position_ids=position_ids)
        return self.layer(x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=cache is not None, position_embeddings=cos_sin)

    def quantize_int8(self) -> EagleHead:
        """Draft with int8 weights (``decodekit.quant``) in the decoder layer and the draft LM
        rows, the bytes a draft step reads (``fc`` stays float): for a target on decodekit's int8
        kernel, where the float32 head cost 0.16x a target forward. Drafts may change at a
        near-tie; the target's verify keeps the output lossless either way."""
        dtype = self.fc.weight.dtype
        quantize_model(self.layer, "int8", dtype)
        rows = nn.Linear(self.shared.lm_rows.shape[1], self.shared.lm_rows.shape[0], bias=False)
        rows.weight.data = self.shared.lm_rows.float()
        self.shared.lm_int8 = QuantLinear(rows, "int8", dtype)
        return self

    def logits(self, hidden: Tensor) -> Tensor:
        """Predicted features ``[..., H]`` -> draft-vocabulary logits ``[..., N]``."""
        if self.shared.lm_int8 is not None:
            return self.shared.lm_int8(self.shared.norm(hidden))
        return nn.functional.linear(self.shared.norm(hidden), self.shared.lm_rows)

    def full_logits(self, small: Tensor) -> Tensor:
        """``[B, N]`` draft-vocabulary logits -> ``[B, V]`` with ``-inf`` outside it."""
        if self.vocab_ids is None:
            return small
        full = small.new_full((*small.shape[:-1], self.shared.vocab), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, small)


def additive_mask(key_mask: Tensor, queries: int, dtype: torch.dtype) -> Tensor:
    """``key_mask [B, K]`` (1 real) -> additive causal mask ``[B, 1, q, K]`` for the last
    ``queries`` columns (finite minimum, so an all-padding query row gives no NaN)."""
    keys = key_mask.shape[1]
    col = torch.arange(keys, device=key_mask.device)
    row = torch.arange(keys - queries, keys, device=key_mask.device)
    allowed = (col[None, :] <= row[:, None])[None] & key_mask.bool()[:, None, :]  # [B, q, K]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class HeadModel(nn.Module):
    """The head as a causal "LM" that ``ModelState`` can drive (cache, holes, rollback, rows):
    ``input_ids`` are the tokens x_{t+1}; the matching features f_t are set in ``features``
    right before each call. Its logits are the predicted features."""

    def __init__(self, head: EagleHead):
        super().__init__()
        self.head = head
        self.config = head.config
        self.features: Tensor | None = None  # [B, k, H] for the next call

    @property
    def device(self) -> torch.device:
        return self.head.device

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=0,
                cache=None):
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        mask = additive_mask(attention_mask, input_ids.shape[1], self.head.fc.weight.dtype)
        hidden = self.head(self.features, input_ids, position_ids, mask, cache)
        self.features = None
        return SimpleNamespace(logits=hidden[:, -logits_to_keep:] if logits_to_keep else hidden)


# ---------------------------------------------------------------------------- the target's hidden states
def _keep_hidden(module, args) -> None:
    module._decodekit_hidden = args[0]


def capture_hidden(target) -> None:
    """Make the target's final norm keep its latest input (one hook per target, idempotent)."""
    norm = decoder_of(target).norm
    if not getattr(norm, "_decodekit_hooked", False):
        norm.register_forward_pre_hook(_keep_hidden)
        norm._decodekit_hooked = True
        norm._decodekit_hidden = None


def take_hidden(target) -> Tensor | None:
    """The hidden states ``[B, T, H]`` of the target's latest forward (None if none since the
    last take)."""
    norm = decoder_of(target).norm
    hidden = getattr(norm, "_decodekit_hidden", None)
    norm._decodekit_hidden = None
    return hidden
