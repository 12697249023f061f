"""The KV-state interface and the backend registry (``decodekit.kvstate``).

A toy backend (a bigram table, no torch parameters, its own ``KVState``) registered by its
model type runs decodekit's strategies unchanged: that is all the llama.cpp backend does too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import decodekit as dk
from decodekit.batch_runner import model_dtype
from decodekit.cache import ModelState
from decodekit.kvstate import TORCH_BACKEND, Backend, KVState, backend_of, register_backend

VOCAB = 11


class BigramModel(nn.Module):
    """Next-token logits depend on the last real token only: ``table[token]``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=512, model_type="bigram")
        self.generation_config = SimpleNamespace(eos_token_id=None, pad_token_id=0)
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class BigramState(KVState):
    """Its "memory" is the last real token of every row: rollback only moves columns."""

    @classmethod
    def empty(cls, model, batch: int, *, use_cache: bool = True) -> BigramState:
        ids = torch.zeros((batch, 0), dtype=torch.long)
        return cls(model, ids, ids.clone())

    def extend(self, tokens, *, token_mask=None, logits_to_keep: int = 0):
        token_mask = torch.ones_like(tokens) if token_mask is None else token_mask.long()
        self.model.calls += 1
        self.append_columns(tokens, token_mask)
        keep = logits_to_keep or tokens.shape[1]
        return self.model.table[tokens[:, -keep:]]  # [B, keep, V]

    def fork(self, index=None):
        index = torch.arange(self.batch_size) if index is None else index
        return BigramState(self.model, self.ids[index], self.mask[index])


register_backend(BigramModel, Backend("bigram", BigramState, dtype_name=lambda model: "bigram:table", in_torch=False))


def reference_greedy(model: BigramModel, start: int, n: int) -> list[int]:
    out, token = [], start
    for _ in range(n):
        token = int(model.table[token].argmax())
        out.append(token)
    return out


def test_the_backend_is_chosen_by_the_model_type(llama):
    assert backend_of(llama) is TORCH_BACKEND
    assert backend_of(BigramModel()).name == "bigram"

    class Derived(BigramModel):
        pass

    assert backend_of(Derived()).state_class is BigramState  # subclasses inherit their backend
    state, logits = ModelState.prefill(BigramModel(), torch.tensor([[3, 4]]))
    assert isinstance(state, BigramState) and logits.shape == (1, 1, VOCAB)
    assert model_dtype(BigramModel()) == "bigram:table"


@pytest.mark.parametrize("strategy", ["greedy", "prompt_lookup", "beam"])
def test_a_registered_backend_runs_the_strategies_unchanged(strategy):
    model = BigramModel(seed=1)
    prompts = [[1, 2, 3, 1, 2], [4, 5]]
    options = {"num_beams": 1} if strategy == "beam" else {}
    out = dk.generate(model, prompts, strategy=strategy, max_new_tokens=12, **options)
    new = [list(seq[-12:]) for seq in out.sequences]
    assert new == [reference_greedy(model, p[-1], 12) for p in prompts]
    assert model.calls > 0


def test_kvstate_bookkeeping_rollback_rows_and_compaction():
    model = BigramModel()
    state, _ = BigramState.prefill(model, torch.tensor([[1, 2, 3], [0, 4, 5]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    state.extend(torch.tensor([[6, 7], [8, 9]]))
    assert state.positions(torch.ones(2, 1, dtype=torch.long)).tolist() == [[5], [4]]
    state.rollback(torch.tensor([0, 2]))  # row 1 forgets its two drafts: holes, not a crop
    assert state.length == 5 and state.mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert state.holes() == 2 and not state.dense
    order = state.compact()
    assert order is not None and state.mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert state.ids[1, -2:].tolist() == [4, 5] and state.holes() == 0
    other, _ = BigramState.prefill(model, torch.tensor([[10]]))
    state.add_rows(other)
    assert state.batch_size == 3 and state.mask[2].tolist() == [0, 0, 0, 0, 1] and int(state.ids[2, -1]) == 10
    state.select_rows(torch.tensor([2, 0]))
    assert state.ids[:, -1].tolist() == [10, 7] and state.mask.sum(-1).tolist() == [1, 5]
    assert state.take_forwards() == 3 and state.take_forwards() == 0
