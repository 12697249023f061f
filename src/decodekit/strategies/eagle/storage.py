"""An EAGLE head on disk: ``model.safetensors`` (its own weights) and ``card.json`` (how it
was trained, for which target), and the head shipped for the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from decodekit.strategies.eagle.head import EagleHead, target_fingerprint
from decodekit.validation import DecodeKitError

__all__ = ["HEAD_FILE", "CARD_FILE", "SHIPPED", "save_head", "read_card", "load_head", "shipped_head_dir",
           "same_target"]

HEAD_FILE = "model.safetensors"
CARD_FILE = "card.json"
SHIPPED = {"smollm2-135m-instruct": "smollm2-135m-instruct"}  # bundled model -> drafters/<dir>


def same_target(card: dict, fingerprint: dict) -> bool:
    want = card.get("target_fingerprint", {})
    exact = all(want.get(k) == fingerprint[k] for k in fingerprint if k != "embed_checksum")
    a, b = float(want.get("embed_checksum", -1)), fingerprint["embed_checksum"]
    return exact and abs(a - b) <= 1e-2 * max(abs(b), 1.0)


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
    if not same_target(card, target_fingerprint(target)):
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
        if (folder / CARD_FILE).is_file() and same_target(read_card(folder), target_fingerprint(target)):
            return folder
    raise DecodeKitError("drafter 'eagle' (the shipped head) is only for the bundled smollm2-135m-instruct; "
                         "for this model train one with `decodekit train-drafter` and pass eagle:DIR")
