"""Bad input to decodekit.generate: one clear error naming the parameter, before any work."""

import pytest

import decodekit as dk
from decodekit import DecodeKitError


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(strategy="nope"), "strategy"),
        (dict(strategy="sample", temperature=-0.5), "temperature"),
        (dict(strategy="sample", top_p=0.0), "top_p"),
        (dict(strategy="sample", top_p=1.2), "top_p"),
        (dict(strategy="sample", top_k=0), "top_k"),
        (dict(strategy="greedy", temperature=0.7), "greedy"),
        (dict(eos_token_id=10_000), "eos_token_id"),
        (dict(eos_token_id=-1), "eos_token_id"),
        (dict(seed=-3), "seed"),
        (dict(bogus_option=1), "bogus_option"),
        (dict(stop_strings=["x"]), "tokenizer"),
    ],
)
def test_bad_arguments(llama, kwargs, match):
    with pytest.raises(DecodeKitError, match=match):
        dk.generate(llama, [[5, 6, 7]], **kwargs)


def test_empty_prompt(llama):
    with pytest.raises(DecodeKitError, match="empty"):
        dk.generate(llama, [[5, 6], []])


def test_prompt_longer_than_context(llama):
    ctx = llama.config.max_position_embeddings
    with pytest.raises(DecodeKitError, match="context"):
        dk.generate(llama, [[5] * ctx])


def test_right_padded_batch_is_realigned(llama):
    import torch

    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = dk.generate(llama, ids, mask, max_new_tokens=5)
    assert out.sequences[1] == dk.generate(llama, [[8, 9]], max_new_tokens=5).sequences[0]
