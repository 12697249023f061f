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

The package: ``head.py`` (the head and the target's parts), ``storage.py`` (a head on disk,
the shipped head), ``drafter.py`` (``EagleDrafter``, the ``eagle`` specs), ``train.py``
(``decodekit train-drafter``: a front door, it runs ``generate``; import it as
``decodekit.strategies.eagle.train``).
"""

from decodekit.strategies.eagle.drafter import EagleDrafter, resolve_eagle
from decodekit.strategies.eagle.head import (
    EagleHead,
    HeadModel,
    additive_mask,
    capture_hidden,
    take_hidden,
    target_fingerprint,
)
from decodekit.strategies.eagle.storage import (
    CARD_FILE,
    HEAD_FILE,
    load_head,
    read_card,
    save_head,
    shipped_head_dir,
)

__all__ = ["EagleHead", "EagleDrafter", "HeadModel", "load_head", "save_head", "read_card", "target_fingerprint",
           "capture_hidden", "take_hidden", "additive_mask", "HEAD_FILE", "CARD_FILE", "shipped_head_dir",
           "resolve_eagle"]
