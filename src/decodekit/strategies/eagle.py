"""EAGLE-style draft head: a drafter that reads the target's own hidden states.

The head (Li et al. 2024, EAGLE) takes the target's last hidden state ``f_t`` (the input of
its final norm) and the embedding of token ``t+1``, projects their concatenation to the
hidden size, runs ONE decoder layer of the target's own architecture and predicts ``f_{t+1}``;
the target's final norm and LM head (frozen, shared, never saved) turn that into the token
at ``t+2``. Drafting ``k`` tokens feeds the head its own predicted features.

Optionally the head drafts from a *draft vocabulary* (FR-Spec): the ``N`` most frequent
tokens of its training data, so its LM head is ``N`` rows of the target's. Its ``q`` is still
a distribution over the full vocabulary (zero outside the draft vocabulary), so ``verify``
stays exact under greedy and sampling.

``EagleDrafter`` never re-runs the target: a forward pre-hook on the target's final norm
keeps the hidden states of the target's latest forward (the prefill, then each verify
forward of ``speculative_loop``), and the drafter takes them right after each of those.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from decodekit.cache import ModelState, left_pad
from decodekit.model_info import vocab_size
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.drafting import Draft, Drafter, chain_draft, draw_draft, maybe_compact
from decodekit.strategies.verify import VerifyResult
from decodekit.validation import DecodeKitError

__all__ = ["EagleHead", "EagleDrafter", "load_head", "save_head", "target_fingerprint", "capture_hidden",
           "take_hidden", "HEAD_FILE", "CARD_FILE", "shipped_head_dir"]

HEAD_FILE = "model.safetensors"
CARD_FILE = "card.json"
SHIPPED = {"smollm2-135m-instruct": "smollm2-135m-instruct"}  # bundled model -> drafters/<dir>


# ---------------------------------------------------------------------------- the target's parts
def _decoder(target):
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
    embed = _decoder(target).embed_tokens.weight
    return dict(model_type=cfg.model_type, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                vocab_size=vocab_size(target), embed_checksum=round(float(embed[:64].float().abs().sum()), 3))


def _same_target(card: dict, fingerprint: dict) -> bool:
    want = card.get("target_fingerprint", {})
    exact = all(want.get(k) == fingerprint[k] for k in fingerprint if k != "embed_checksum")
    a, b = float(want.get("embed_checksum", -1)), fingerprint["embed_checksum"]
    return exact and abs(a - b) <= 1e-2 * max(abs(b), 1.0)


class _Shared:
    """The target's frozen parts the head uses (held outside the head's parameters: never saved)."""

    def __init__(self, target, vocab_ids: Tensor | None):
        decoder = _decoder(target)
        self.embed, self.norm, self.rotary = decoder.embed_tokens, decoder.norm, decoder.rotary_emb
        weight = target.get_output_embeddings().weight  # [V, H]
        if not weight.is_floating_point():
            raise DecodeKitError("drafter 'eagle' needs a float LM head (load the target in a float dtype)")
        self.vocab = weight.shape[0]
        self.lm_rows = weight.detach() if vocab_ids is None else weight.detach().index_select(0, vocab_ids)


# ---------------------------------------------------------------------------- the head
class EagleHead(nn.Module):
    """fc(concat(f_t, embed(x_{t+1}))) -> one decoder layer -> predicted ``f_{t+1}``.

    ``vocab_ids [N]`` (a buffer, saved): the draft vocabulary; None = the full vocabulary.
    """

    def __init__(self, target, vocab_ids: Tensor | None = None):
        super().__init__()
        decoder = _decoder(target)
        config = copy.deepcopy(target.config)
        config.num_hidden_layers = 1
        config._attn_implementation = "sdpa"
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[-1]]
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = type(decoder.layers[0])(config, layer_idx=0)
        self.layer.load_state_dict(decoder.layers[-1].state_dict())  # start from the target's last layer
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

    def logits(self, hidden: Tensor) -> Tensor:
        """Predicted features ``[..., H]`` -> draft-vocabulary logits ``[..., N]``."""
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


class _HeadModel(nn.Module):
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
    norm = _decoder(target).norm
    if not getattr(norm, "_decodekit_hooked", False):
        norm.register_forward_pre_hook(_keep_hidden)
        norm._decodekit_hooked = True
        norm._decodekit_hidden = None


def take_hidden(target) -> Tensor | None:
    """The hidden states ``[B, T, H]`` of the target's latest forward (None if none since the
    last take)."""
    norm = _decoder(target).norm
    hidden = getattr(norm, "_decodekit_hidden", None)
    norm._decodekit_hidden = None
    return hidden


# ---------------------------------------------------------------------------- the drafter
class EagleDrafter(Drafter):
    """Chain drafting with an ``EagleHead`` on the target's hidden states.

    Head column ``j`` of row ``b`` is the pair ``(f_j, x_{j+1})``. ``pending[b]`` holds the
    target features the head has not consumed yet (the prompt's at first, then each verify
    forward's kept ones: ``[last, accepted drafts]``). ``propose`` feeds the pending pairs
    (right aligned, left padding masked), drafts from the last output, and feeds its own
    predicted features for drafts ``2..k``; ``update`` crops those ``k - 1`` self-fed columns
    (the target's true features replace them) and queues the new features.
    """

    name = "eagle"

    def __init__(self, target, head: EagleHead):
        self.target, self.head = target, head
        self.model = head.__dict__.setdefault("_state_model", _HeadModel(head))  # one per head (add_rows)
        self.memory = head.__dict__.setdefault("_drafter_memory", {})
        self.state: ModelState | None = None
        self.pending: list[Tensor] = []
        self.consumed: list[int] = []
        self.fed = 0
        self._costs: dict[int, float] = head.__dict__.setdefault("_step_costs", {})
        capture_hidden(target)

    def prefill(self, req: DecodeRequest) -> None:
        """Take the prompt's features from the target's prefill (which ran just before)."""
        self.req = req
        batch = req.input_ids.shape[0]
        self.state = ModelState.empty(self.model, batch)
        self.consumed, self.fed = [0] * batch, 0
        hidden = take_hidden(self.target)  # [B or P, T', H]
        if hidden is None:  # nothing fed (a one-token prompt without first_target)
            self.pending = [self._no_features() for _ in range(batch)]
            return
        if req.shared is not None:
            hidden = hidden.index_select(0, req.shared.to(hidden.device))
        mask = req.attention_mask[:, : hidden.shape[1]].to(hidden.device).bool()  # [B, T']
        self.pending = [h[m] for h, m in zip(hidden, mask)]

    def _no_features(self) -> Tensor:
        return torch.zeros(0, self.head.config.hidden_size, dtype=self.head.fc.weight.dtype, device=self.head.device)

    def _feed(self, tokens: Tensor, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pairs ``tokens [B, n]`` / ``features [B, n, H]`` into the head's cache -> the last
        column's predicted features ``[B, H]``."""
        self.model.features = features
        return self.state.extend(tokens, token_mask=mask, logits_to_keep=1)[:, -1]

    def _feed_pending(self, rows: list[list[int]]) -> Tensor:
        """Every row's pending pairs at once -> ``[B, H]`` (garbage for a row with none: it
        drafts nothing)."""
        width = max(len(p) for p in self.pending)
        tokens = [r[c + 1: c + 1 + len(p)] for r, c, p in zip(rows, self.consumed, self.pending)]
        ids, mask = left_pad(tokens, self.req.pad_token_id)  # [B, n]
        feats = torch.stack([nn.functional.pad(p, (0, 0, width - len(p), 0)) for p in self.pending])
        hidden = self._feed(ids, feats, mask)
        self.consumed = [c + len(p) for c, p in zip(self.consumed, self.pending)]
        self.pending = [p[:0] for p in self.pending]
        return hidden

    def _draw(self, hidden: Tensor, rows: list[list[int]] | None) -> tuple[Tensor, Tensor]:
        """Predicted features ``[B, H]`` -> ``q [B, V]`` (processed like p, zero outside the
        draft vocabulary) and a draft ``[B]``."""
        logits = self.head.full_logits(self.head.logits(hidden)).float()  # [B, V]
        return draw_draft(self.req, logits, rows)

    def _feed_draft(self, x: Tensor, hidden: Tensor) -> Tensor:
        """Draft ``x [B]`` with the features ``[B, H]`` it was drawn from -> the next ``[B, H]``."""
        return self._feed(x[:, None].to(self.head.device), hidden[:, None])

    def propose(self, rows: list[list[int]], k: int) -> Draft:
        ready = torch.tensor([len(p) > 0 for p in self.pending])  # [B] a row without features yet
        if not bool(ready.any()):  # (a one-token prompt without first_target) drafts nothing
            return Draft.empty(len(rows), self.head.device)
        hidden = self._feed_pending(rows)  # [B, H]
        tokens, q = chain_draft(self.req, rows, k, hidden, self._draw, self._feed_draft)  # [B, k], [B, k, V]
        self.fed = max(k - 1, 0)
        drafted = torch.where(ready, k, 0).to(hidden.device)
        return Draft(tokens, drafted, q)

    def update(self, draft: Draft, result: VerifyResult, p: Tensor) -> None:
        self.state.crop(self.fed)  # the head's own features: replaced by the target's below
        self.fed = 0
        hidden = take_hidden(self.target)  # [B, k+1, H]: this verify forward's [last, drafts]
        if hidden is None:
            raise RuntimeError("eagle drafter: the target's verify forward left no hidden states")
        hidden = hidden[:, hidden.shape[1] - draft.k - 1:]
        kept = (result.accepted + 1).tolist()  # [last, accepted drafts]
        self.pending = [torch.cat([p, h[:n].to(p.dtype)]) for p, h, n in zip(self.pending, hidden, kept)]
        maybe_compact(self.state)

    def select_rows(self, index: Tensor) -> None:
        self.state.select_rows(index)
        keep = index.tolist()
        self.pending = [self.pending[i] for i in keep]
        self.consumed = [self.consumed[i] for i in keep]

    def add_rows(self, other: Drafter) -> None:
        """Continuous batching: the rows of ``other`` (a drafter of the same head, prefilled
        for the joining rows) come after ours (between steps nothing self-fed is held)."""
        if not isinstance(other, EagleDrafter) or other.head is not self.head:
            raise NotImplementedError("only a drafter of the same eagle head can take rows")
        self.state.add_rows(other.state)
        self.pending += other.pending
        self.consumed += other.consumed

    @torch.inference_mode()
    def step_cost(self, batch: int) -> float:
        """Seconds of one drafting step (head forward + LM-head rows) for ``batch`` rows,
        measured once per batch size after 64 tokens of context."""
        if batch not in self._costs:
            state = ModelState.empty(self.model, batch)
            hidden_size = self.head.config.hidden_size
            feats = torch.zeros(batch, 64, hidden_size, dtype=self.head.fc.weight.dtype, device=self.head.device)
            self.model.features = feats
            state.extend(torch.zeros(batch, 64, dtype=torch.long), logits_to_keep=1)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                self.model.features = feats[:, :1]
                self.head.logits(state.extend(torch.zeros(batch, 1, dtype=torch.long))[:, -1])
                times.append(time.perf_counter() - t0)
                state.crop(1)
            self._costs[batch] = sorted(times)[1]
        return self._costs[batch]


# ---------------------------------------------------------------------------- files
def save_head(head: EagleHead, folder: Path, card: dict, dtype: torch.dtype = torch.bfloat16) -> None:
    """``model.safetensors`` (the head's own weights, in ``dtype``) + ``card.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if not v.is_floating_point() else v.to(dtype)).contiguous().cpu()
               for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / HEAD_FILE))
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def read_card(folder: Path) -> dict:
    try:
        return json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DecodeKitError(f"drafter eagle:{folder}: no readable {CARD_FILE} ({exc})") from exc


def load_head(folder, target) -> EagleHead:
    """The head in ``folder`` for ``target`` (refused for another target)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEAD_FILE).is_file():
        raise DecodeKitError(f"drafter eagle:{folder}: no {HEAD_FILE} there (train one with "
                             "`decodekit train-drafter`)")
    card = read_card(folder)
    if not _same_target(card, target_fingerprint(target)):
        raise DecodeKitError(f"drafter eagle:{folder} was trained for {card.get('target', '?')!r}, "
                             "not for this model")
    tensors = load_file(str(folder / HEAD_FILE))
    head = EagleHead(target, tensors.get("vocab_ids"))
    head.load_state_dict({k: v for k, v in tensors.items()})
    return head.eval().requires_grad_(False)


def shipped_head_dir(target) -> Path:
    """The head shipped with decodekit for ``target`` (a bundled model), or a one-line error."""
    from importlib import resources

    for sub in SHIPPED.values():
        folder = Path(str(resources.files("decodekit").joinpath("drafters", sub)))
        if (folder / CARD_FILE).is_file() and _same_target(read_card(folder), target_fingerprint(target)):
            return folder
    raise DecodeKitError("drafter 'eagle' (the shipped head) is only for the bundled smollm2-135m-instruct; "
                         "for this model train one with `decodekit train-drafter` and pass eagle:DIR")


def resolve_eagle(spec: str, target) -> EagleDrafter:
    """``"eagle"`` (the shipped head) or ``"eagle:DIR"`` -> a new drafter (heads loaded once per
    target and kept on it)."""
    folder = shipped_head_dir(target) if spec == "eagle" else Path(spec[len("eagle:"):]).expanduser()
    if not str(folder):
        raise DecodeKitError("drafter eagle:DIR needs a directory")
    cache = target.__dict__.setdefault("_decodekit_eagle", {})
    head_file = folder / HEAD_FILE
    key = (str(folder.resolve()), head_file.stat().st_mtime_ns if head_file.is_file() else 0)
    if key not in cache:
        cache[key] = load_head(folder, target)
    return EagleDrafter(target, cache[key])
