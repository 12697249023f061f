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


@pytest.mark.parametrize(
    "input_ids,kwargs,match",
    [
        ([[5, 6, 7]], dict(attention_mask=[[1, 1]]), r"attention_mask has shape \[1, 2\]"),
        ([5, 6, 7], dict(attention_mask=[1, 1, 1, 1]), "attention_mask has shape"),
        ([[5, 6, 7]], dict(attention_mask=[[1, 2, 1]]), "attention_mask must hold only 0"),
        ([[5, 1000]], {}, r"input_ids must be token ids in \[0, 97\)"),
        ([[5, -1]], {}, r"input_ids must be token ids in \[0, 97\)"),
        ([[[5, 6]], [[7, 8]]], {}, r"input_ids must have shape \[T\] or \[B, T\].*\[2, 1, 2\]"),
        ([[5.0, 6.0]], {}, "input_ids must hold integer token ids"),
        ([[5, 6], [7, 8]], dict(pad_token_id=1000), "pad_token_id"),
        ([[5, 6], [7, 8]], dict(pad_token_id=-2), "pad_token_id"),
    ],
)
def test_bad_tensors_name_the_parameter(llama, input_ids, kwargs, match):
    import torch

    kwargs = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    with pytest.raises(DecodeKitError, match=match):
        dk.generate(llama, torch.tensor(input_ids), max_new_tokens=2, **kwargs)


@pytest.mark.parametrize(
    "input_ids,match",
    [
        ([[5, 1000]], "input_ids must be token ids"),
        ([-1, 5], "input_ids must be token ids"),
        ([[[5, 6]], [[7, 8]]], r"input_ids must have shape \[T\] or \[B, T\]"),
        ([["a", "b"]], "input_ids must have shape"),
        ("hello", "input_ids must have shape"),
    ],
)
def test_bad_lists_name_the_parameter(llama, input_ids, match):
    with pytest.raises(DecodeKitError, match=match):
        dk.generate(llama, input_ids, max_new_tokens=2)


def test_padded_lists_with_a_mask_use_the_mask(llama):
    """Lists + attention_mask (a tokenizer without return_tensors): padding stays padding."""
    out = dk.generate(llama, [[0, 8, 9], [5, 6, 7]], [[0, 1, 1], [1, 1, 1]], max_new_tokens=4)
    assert out.sequences == dk.generate(llama, [[8, 9], [5, 6, 7]], max_new_tokens=4).sequences
    with pytest.raises(DecodeKitError, match="rectangular"):
        dk.generate(llama, [[8, 9], [5, 6, 7]], [[1, 1], [1, 1, 1]], max_new_tokens=4)


def test_prompt_plus_max_new_tokens_must_fit_the_context(llama):
    ctx = llama.config.max_position_embeddings
    with pytest.raises(DecodeKitError, match=r"max_new_tokens=10 .* at most 6 new tokens"):
        dk.generate(llama, [[5] * (ctx - 6)], max_new_tokens=10)
    out = dk.generate(llama, [[5] * (ctx - 6)], max_new_tokens=6, eos_token_id=[])
    assert len(out.sequences[0]) == 6


class _AllE:
    """A toy tokenizer: every token reads as the letter "e"."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return "e" * len(ids)


def test_stop_strings_plain_str_is_one_string(llama):
    """"there" is one stop string (as in transformers), not the characters t, h, e, r, e."""
    out = dk.generate(llama, [[5, 6]], max_new_tokens=6, eos_token_id=[], stop_strings="there",
                      tokenizer=_AllE())
    assert len(out.sequences[0]) == 6 and out.stats[0].finish_reason == "length"
    out = dk.generate(llama, [[5, 6]], max_new_tokens=6, eos_token_id=[], stop_strings="eee",
                      tokenizer=_AllE())
    assert len(out.sequences[0]) == 3 and out.stats[0].finish_reason == "stop_string"


@pytest.mark.parametrize("stop", ["", [""], ["ok", ""], [3], 5])
def test_bad_stop_strings(llama, stop):
    with pytest.raises(DecodeKitError, match="stop_strings"):
        dk.generate(llama, [[5, 6]], max_new_tokens=2, stop_strings=stop, tokenizer=_AllE())


def test_drafter_spec_errors_name_drafter(llama):
    with pytest.raises(DecodeKitError, match="^drafter 'nonsense'"):
        dk.generate(llama, [[5, 6]], strategy="speculative", drafter="nonsense", max_new_tokens=2)
