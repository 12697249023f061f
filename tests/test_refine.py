"""Iterative block refinement (the seed's rule) and Jacobi decoding (= greedy)."""

from __future__ import annotations

import pytest
import torch

from decodekit import (
    DecodeKitError,
    format_refine_trace,
    generate,
    iterative_generate,
)

from conftest import CHAT_PROMPTS, EOS, chat_batch, tiny_gemma3, tiny_llama


def seed_reference(model, prompt: list[int], add_eos_length: int, refine_iter: int,
                   max_new_tokens: int, eos: int = EOS) -> list[int]:
    """The seed's loop, written out with plain full forwards (batch 1, no cache)."""
    n = add_eos_length
    seq = torch.tensor([prompt])
    while True:
        pre = seq.shape[1]
        seq = torch.cat([seq, torch.full((1, n), eos)], dim=1)  # EOS placeholders
        for step in range(refine_iter):
            pred = model(seq).logits[:, pre - 1 : pre + n].argmax(-1)  # n + 1 predictions
            if step == 0:
                seq[:, pre:] = pred[:, :n]  # overwrite the placeholders...
                seq = torch.cat([seq, pred[:, n:]], dim=1)  # ...and append the last one
            else:
                seq[:, pre : pre + n + 1] = pred  # later passes overwrite the whole block
        new = seq[0, len(prompt):].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        if eos in new or len(new) >= max_new_tokens:
            return new[:max_new_tokens]


def greedy(model, rows, max_new_tokens, **kw):
    return generate(model, rows, strategy="greedy", max_new_tokens=max_new_tokens, **kw).sequences


# ---------------------------------------------------------------------------- seed rule
@torch.inference_mode()
def test_two_pass_example_matches_the_seed_rule_position_by_position(llama):
    prompt = [5, 17, 42, 8, 66, 23]
    n, pre = 4, len(prompt)
    # pass 1 by hand: EOS placeholders, next-token shift, n + 1 predictions
    seq = torch.tensor([prompt + [EOS] * n])
    pass1 = llama(seq).logits[0, pre - 1 : pre + n].argmax(-1).tolist()
    # pass 2: the sequence is prompt + pass1 (n written over the placeholders, 1 appended)
    seq = torch.tensor([prompt + pass1])
    pass2 = llama(seq).logits[0, pre - 1 : pre + n].argmax(-1).tolist()
    assert pass1 != pass2, "pick a prompt where the second pass changes the block"
    assert EOS not in pass2

    out = generate(llama, [prompt], strategy="refine", add_eos_length=n, refine_iter=2,
                   max_new_tokens=n + 1, debug=True)
    assert out.sequences[0] == pass2
    passes = out.debug[0]["passes"]
    assert [p["pass"] for p in passes] == [1, 2]
    assert passes[0]["iterate"] == pass1 and passes[1]["iterate"] == pass2
    assert passes[0]["changed"] == [i for i, t in enumerate(pass1) if t != EOS]
    assert passes[1]["changed"] == [i for i in range(n + 1) if pass1[i] != pass2[i]]
    # the seed API returns the full sequence: prompt + block
    full = iterative_generate(llama, torch.tensor([prompt]), max_new_tokens=n + 1,
                              add_eos_length=n, refine_iter=2)
    assert full[0].tolist() == prompt + pass2


@pytest.mark.parametrize("n,refine_iter,use_cache", [(3, 2, True), (3, 2, False), (5, 1, True), (4, 3, False)])
def test_refine_equals_the_seed_loop_over_many_blocks(tiny_model, n, refine_iter, use_cache):
    gen = torch.Generator().manual_seed(n * 10 + refine_iter)
    for length in (1, 4, 9):
        prompt = torch.randint(4, 97, (length,), generator=gen).tolist()
        with torch.inference_mode():
            expected = seed_reference(tiny_model, prompt, n, refine_iter, 20)
        out = generate(tiny_model, [prompt], strategy="refine", add_eos_length=n,
                       refine_iter=refine_iter, max_new_tokens=20, use_cache=use_cache)
        assert out.sequences[0] == expected


def test_cached_refine_runs_the_prompt_once_and_then_only_the_block(llama):
    fed = []
    hook = llama.register_forward_pre_hook(lambda mod, args, kw: fed.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        out = generate(llama, [list(range(10, 30))], strategy="refine", add_eos_length=6,
                       refine_iter=3, max_new_tokens=21, eos_token_id=[])
    finally:
        hook.remove()
    assert len(out.sequences[0]) == 21
    assert fed[0] == 20 + 6  # prompt + placeholders, once
    assert max(fed[1:]) <= 6 + 7  # afterwards: at most the uncached tail of a block + the block
    assert len(fed) == out.stats[0].forward_passes <= 3 * 3


def test_batched_refine_rows_are_independent(tiny_model):
    rows = [[7, 8, 9], [11] * 9, [40, 41, 42, 43, 44], [2, 90]]
    solo = [generate(tiny_model, [r], strategy="refine", add_eos_length=4, refine_iter=2,
                     max_new_tokens=25).sequences[0] for r in rows]
    batch = generate(tiny_model, rows, strategy="refine", add_eos_length=4, refine_iter=2, max_new_tokens=25)
    assert batch.sequences == solo


def test_eos_in_one_row_does_not_stop_the_others(llama):
    rows = [[5, 6, 7, 8], [30, 31, 32, 33, 34, 35], [60, 61]]
    free = greedy(llama, rows, 12, eos_token_id=[])  # = refine_iter="converge", whatever the EOS
    cut, eos = next((i, t) for i, t in enumerate(free[0]) if all(t not in r for r in free[1:]))
    full = iterative_generate(llama, torch.tensor([[0, 0] + rows[0], rows[1], [0] * 4 + rows[2]]),
                              attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0] * 4 + [1, 1]]),
                              max_new_tokens=12, add_eos_length=3, refine_iter="converge",
                              eos_token_id=eos, pad_token_id=0)
    assert full.shape == (3, 6 + 12)
    assert full[1:, :6].tolist() == [rows[1], [0] * 4 + rows[2]]  # prompts returned as given
    new = full[:, 6:].tolist()
    assert new[0] == free[0][: cut + 1] + [0] * (11 - cut)  # cut after its EOS, right-padded
    assert new[1] == free[1] and new[2] == free[2]  # the others ran to max_new_tokens


def test_max_length_trims_each_row(llama):
    rows = [[5, 6, 7, 8, 9, 10], [20, 21]]
    out = generate(llama, rows, strategy="refine", add_eos_length=5, refine_iter=2,
                   max_new_tokens=50, max_length=10, eos_token_id=[])
    assert [len(s) for s in out.sequences] == [4, 8]
    longer = generate(llama, rows, strategy="refine", add_eos_length=5, refine_iter=2,
                      max_new_tokens=50, max_length=40, eos_token_id=[])
    assert [s[: len(t)] for s, t in zip(longer.sequences, out.sequences)] == out.sequences


# ---------------------------------------------------------------------------- Jacobi
@pytest.mark.parametrize("block_size,use_cache", [(1, True), (3, False), (8, True)])
def test_jacobi_equals_greedy_tiny(tiny_model, block_size, use_cache):
    gen = torch.Generator().manual_seed(block_size)
    rows = [torch.randint(4, 97, (n,), generator=gen).tolist() for n in (3, 9, 5, 12)]
    out = generate(tiny_model, rows, strategy="jacobi", block_size=block_size, max_new_tokens=24,
                   use_cache=use_cache)
    assert out.sequences == greedy(tiny_model, rows, 24)
    for stats, record in zip(out.stats, out.debug):
        assert sum(record["block_iterations"]) == stats.forward_passes
        assert all(1 <= it <= block_size for it in record["block_iterations"])
        assert record["unconverged_tokens"] == 0
        assert stats.tokens_per_forward >= 1.0
        assert stats.accepted + len(stats.accept_lengths) >= stats.new_tokens  # accepted + 1 per pass


def test_refine_converge_is_jacobi(tiny_model):
    rows = [[9, 10, 11], [50, 51, 52, 53, 54, 55, 56]]
    conv = generate(tiny_model, rows, strategy="refine", add_eos_length=5, refine_iter="converge",
                    max_new_tokens=20)
    assert conv.sequences == greedy(tiny_model, rows, 20)
    full = iterative_generate(tiny_model, torch.tensor([rows[0]]), max_new_tokens=20, add_eos_length=5,
                              refine_iter="converge")
    assert full[0, 3:].tolist()[: len(conv.sequences[0])] == conv.sequences[0]


def test_a_pass_cap_makes_jacobi_lossy_and_counted(llama):
    rows = [[5, 17, 42, 8, 66, 23]]
    exact = generate(llama, rows, strategy="jacobi", block_size=8, max_new_tokens=24, eos_token_id=[])
    capped = generate(llama, rows, strategy="jacobi", block_size=8, max_iterations=1,
                      max_new_tokens=24, eos_token_id=[])
    assert exact.sequences == greedy(llama, rows, 24, eos_token_id=[])
    assert capped.stats[0].forward_passes == 3  # one pass per 8-token block
    assert 0 < capped.debug[0]["unconverged_tokens"] <= 24 - 3  # each pass's first token is exact
    assert capped.sequences != exact.sequences


def test_debug_trace_and_its_text_view(llama):
    out = generate(llama, [[5, 6, 7]], strategy="jacobi", block_size=4, max_new_tokens=8, debug=True)
    passes = out.debug[0]["passes"]
    assert len(passes) == out.stats[0].forward_passes
    assert passes[-1]["iterate"] == out.sequences[0][-4:] or len(out.sequences[0]) < 8
    text = format_refine_trace(out.debug)
    assert "block 0 pass 1" in text and "[" in text
    assert "passes per block" in text


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(strategy="refine", refine_iter=0), "refine_iter"),
        (dict(strategy="refine", refine_iter="often"), "refine_iter"),
        (dict(strategy="refine", add_eos_length=0), "add_eos_length"),
        (dict(strategy="refine", max_length=6), "max_length"),
        (dict(strategy="refine", max_length=3), "max_length"),
        (dict(strategy="refine", temperature=0.7), "greedy only"),
        (dict(strategy="jacobi", block_size=0), "block_size"),
        (dict(strategy="jacobi", max_iterations=0), "max_iterations"),
        (dict(strategy="jacobi", gamma=3), "unknown option"),
    ],
)
def test_bad_options_fail_before_any_model_work(options, match):
    model = tiny_llama()
    model.forward = None  # any model call would raise TypeError
    with pytest.raises(DecodeKitError, match=match):
        generate(model, [[5, 6, 7, 8, 9, 10]], max_new_tokens=5, **options)


def test_seed_api_refuses_empty_and_too_long_prompts():
    model = tiny_gemma3()
    with pytest.raises(DecodeKitError, match="empty"):
        iterative_generate(model, torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(DecodeKitError, match="max_length"):
        iterative_generate(model, torch.arange(5, 15)[None], max_length=10)
    with pytest.raises(DecodeKitError, match="refine_iter"):
        iterative_generate(model, torch.arange(5, 15)[None], refine_iter=0)


# ---------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_jacobi_equals_greedy_on_chat_prompts(real_model, batch_size):
    model, tokenizer = real_model
    prompts = CHAT_PROMPTS[:12] if batch_size == 4 else CHAT_PROMPTS[:10]
    for start in range(0, len(prompts), batch_size):
        ids, mask = chat_batch(tokenizer, prompts[start : start + batch_size])
        want = generate(model, ids, mask, strategy="greedy", max_new_tokens=10).sequences
        got = generate(model, ids, mask, strategy="jacobi", block_size=5, max_new_tokens=10).sequences
        assert got == want, prompts[start : start + batch_size]
