"""decodekit.attention: the grouped-query SDPA path of verify forwards gives transformers' SDPA
attention's logits without copying the key/value heads, and load_model switches to it."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa

import decodekit
from decodekit.attention import ATTENTION, use_gqa_attention
from decodekit.cache import ModelState

from conftest import tiny_gemma3, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def verify_logits(model, context: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A cached forward of ``new`` [B, k] after ``context`` [B, n] -> logits [B, k, V]."""
    state, _ = ModelState.prefill(model, context)
    return state.extend(new)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_verify_forwards_equal_transformers_sdpa_without_copying_kv(make, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(4, 97, (2, 11), generator=gen)  # [B, n]
    new = torch.randint(4, 97, (2, 5), generator=gen)  # [B, k]
    model = make(seed=3)
    expected = verify_logits(model, context, new)  # transformers' SDPA attention
    use_gqa_attention(model)
    assert model.config._attn_implementation == ATTENTION

    def no_copies(*args, **kwargs):
        raise AssertionError("repeat_kv called: the verify forward took transformers' copying path")

    monkeypatch.setattr(hf_sdpa, "repeat_kv", no_copies)
    got = verify_logits(model, context, new)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_greedy_is_unchanged_and_load_model_switches(tiny_model_dir):
    model, _ = decodekit.load_model(str(tiny_model_dir))
    assert model.config._attn_implementation == ATTENTION
    prompts = [[5, 9, 11, 5, 9, 11, 5, 9], [7, 20, 31]]
    ours = decodekit.generate(model, prompts, strategy="prompt_lookup", max_new_tokens=16, eos_token_id=[])
    model.set_attn_implementation("sdpa")
    theirs = decodekit.generate(model, prompts, strategy="prompt_lookup", max_new_tokens=16, eos_token_id=[])
    assert ours.sequences == theirs.sequences


def test_models_without_sdpa_are_left_alone():
    model = tiny_llama(seed=1)
    model.set_attn_implementation("eager")
    use_gqa_attention(model)
    assert model.config._attn_implementation == "eager"
