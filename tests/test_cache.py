import pytest
import torch
from transformers import DynamicCache

from decodekit import ModelState, left_pad, prune_cache


def full_logits(model, rows):
    """Reference: one plain forward per row, no cache, no padding: [T, V] per row."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([r])).logits[0] for r in rows]


ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 17], [13, 14, 15, 16]]


@torch.no_grad()
def test_prefill_then_extend_matches_full_forward(tiny_model):
    ids, mask = left_pad([r[:-2] for r in ROWS], 0)
    state, logits = ModelState.prefill(tiny_model, ids, mask)
    step = state.extend(torch.tensor([[r[-2], r[-1]] for r in ROWS]))  # [B, 2, V]
    ref = full_logits(tiny_model, ROWS)
    for b, r in enumerate(ref):
        assert torch.allclose(logits[b, -1], r[-3], atol=1e-4)
        assert torch.allclose(step[b], r[-2:], atol=1e-4)


@torch.no_grad()
def test_crop_then_extend_is_a_clean_rollback(tiny_model):
    ids, mask = left_pad(ROWS, 0)
    state, _ = ModelState.prefill(tiny_model, ids, mask)
    state.extend(torch.tensor([[40, 41, 42]] * 3))
    state.crop(3)
    out = state.extend(torch.tensor([[50]] * 3))[:, -1]
    ref = full_logits(tiny_model, [r + [50] for r in ROWS])
    for b in range(3):
        assert torch.allclose(out[b], ref[b][-1], atol=1e-4)


@torch.no_grad()
def test_ragged_rollback_holes_are_invisible(tiny_model):
    """Row b forgets a different number of tokens; later logits equal a clean sequence."""
    ids, mask = left_pad(ROWS, 0)
    state, _ = ModelState.prefill(tiny_model, ids, mask)
    drafts = torch.tensor([[20, 21, 22], [23, 24, 25], [26, 27, 28]])
    state.extend(drafts)
    forget = torch.tensor([0, 2, 1])
    assert state.dense is False  # left padding
    state.rollback(forget)
    assert state.holes() == 3  # nobody forgot 0 columns... row 0 forgot none, so 2 + 1 holes
    out = state.extend(torch.tensor([[60], [61], [62]]))[:, -1]
    kept = [r + d[: 3 - f] for r, d, f in zip(ROWS, drafts.tolist(), forget.tolist())]
    ref = full_logits(tiny_model, [k + [60 + b] for b, k in enumerate(kept)])
    for b in range(3):
        assert torch.allclose(out[b], ref[b][-1], atol=1e-4)
    # compacting removes the holes and changes nothing
    state.compact()
    assert state.holes() == 0
    out2 = state.extend(torch.tensor([[70], [71], [72]]))[:, -1]
    ref2 = full_logits(tiny_model, [k + [60 + b, 70 + b] for b, k in enumerate(kept)])
    for b in range(3):
        assert torch.allclose(out2[b], ref2[b][-1], atol=1e-4)


@torch.no_grad()
def test_dense_flag_tracks_padding_and_holes(llama):
    state, _ = ModelState.prefill(llama, torch.tensor([[5, 6, 7], [8, 9, 10]]))
    assert state.dense
    state.extend(torch.tensor([[11, 12], [13, 14]]))
    assert state.dense  # plain decode keeps it: no host sync needed per step
    state.rollback(torch.tensor([0, 1]))
    assert not state.dense and state.holes() == 1
    state.compact()
    assert not state.dense  # row 1 is now left-padded
    state.rollback(torch.tensor([0, 0]))
    ref, _ = ModelState.prefill(llama, torch.tensor([[5, 6, 7, 11, 12]]))
    assert torch.allclose(state.extend(torch.tensor([[20], [20]]))[0, -1], ref.extend(torch.tensor([[20]]))[0, -1], atol=1e-4)


@torch.no_grad()
def test_select_rows_and_fork(tiny_model):
    ids, mask = left_pad(ROWS, 0)
    state, _ = ModelState.prefill(tiny_model, ids, mask)
    fork = state.fork(torch.tensor([2, 2, 0]))
    fork_out = fork.extend(torch.tensor([[30], [31], [32]]))[:, -1]
    # the original is untouched by the fork
    assert state.length == ids.shape[1]
    state.select_rows(torch.tensor([2, 0]))
    out = state.extend(torch.tensor([[30], [32]]))[:, -1]
    assert torch.allclose(out[0], fork_out[0], atol=1e-5)
    assert torch.allclose(out[1], fork_out[2], atol=1e-5)
    ref = full_logits(tiny_model, [ROWS[2] + [31]])[0][-1]
    assert torch.allclose(fork_out[1], ref, atol=1e-4)


@torch.no_grad()
def test_no_cache_mode_gives_the_same_logits(tiny_model):
    ids, mask = left_pad(ROWS, 0)
    a, la = ModelState.prefill(tiny_model, ids, mask, use_cache=True)
    b, lb = ModelState.prefill(tiny_model, ids, mask, use_cache=False)
    assert torch.allclose(la, lb, atol=1e-4)
    tok = torch.tensor([[44, 45]] * 3)
    assert torch.allclose(a.extend(tok), b.extend(tok), atol=1e-4)
    a.rollback(torch.tensor([1, 0, 2]))
    b.rollback(torch.tensor([1, 0, 2]))
    assert torch.allclose(a.extend(tok[:, :1]), b.extend(tok[:, :1]), atol=1e-4)


def test_prune_cache_both_forms():
    k = torch.randn(1, 2, 5, 4)
    legacy = ((k, k.clone()), (k, k.clone()))
    assert prune_cache(legacy, 0) is legacy
    pruned = prune_cache(legacy, 2)
    assert pruned[0][0].shape[2] == 3 and pruned[1][1].shape[2] == 3
    cache = DynamicCache()
    cache.update(k, k.clone(), 0)
    prune_cache(cache, 0)
    assert cache.get_seq_length() == 5
    prune_cache(cache, 3)
    assert cache.get_seq_length() == 2
    with pytest.raises(ValueError):
        prune_cache(cache, -1)


@torch.no_grad()
def test_empty_state_and_the_forward_count(tiny_model):
    state = ModelState.empty(tiny_model, 3)
    assert state.ids.shape == (3, 0) and state.mask.shape == (3, 0) and state.length == 0
    ids, mask = left_pad(ROWS, 0)
    state.extend(ids, token_mask=mask)
    state.extend(torch.tensor([[40]] * 3))
    assert state.forwards == 2 and state.take_forwards() == 2 and state.take_forwards() == 0
    state.extend(torch.tensor([[41]] * 3))
    fork = state.fork(torch.tensor([0, 0]))  # the fork takes the forwards not yet taken
    assert fork.take_forwards() == 1 and state.take_forwards() == 0 and state.forwards == 3
    no_cache = ModelState.empty(tiny_model, 2, use_cache=False)
    assert no_cache.cache is None and not no_cache.use_cache


@torch.no_grad()
def test_dense_again_after_masked_columns_are_cropped(llama):
    """A verify step with unused draft slots (mask 0) must not leave the state on the slow
    masked path once those columns are rolled back (a prompt-lookup slowdown, 1.3x)."""
    state, _ = ModelState.prefill(llama, torch.tensor([[5, 6, 7]]))
    state.extend(torch.tensor([[8, 9, 0]]), token_mask=torch.tensor([[1, 1, 0]]))
    assert not state.dense
    state.rollback(torch.tensor([1]))
    assert state.dense


@torch.no_grad()
@pytest.mark.parametrize("joiner", [[21, 22], list(range(23, 47))])  # 24 tokens: past the 16-token window
def test_add_rows_equals_a_fresh_batched_prefill(tiny_model, joiner):
    """Continuous batching: a running batch (with holes) takes a freshly prefilled row, shorter
    or longer than it; every row then decodes exactly as if prefilled alone (Gemma-3 too)."""
    ids, mask = left_pad(ROWS[:2], 0)
    running, _ = ModelState.prefill(tiny_model, ids, mask)
    running.extend(torch.tensor([[40, 41, 42], [43, 44, 45]]))
    running.rollback(torch.tensor([1, 2]))  # row 1's 44, 45 become a hole / are cropped
    histories = [ROWS[0] + [40, 41], ROWS[1] + [43]]
    fresh, _ = ModelState.prefill(tiny_model, torch.tensor([joiner]))
    running.add_rows(fresh)
    assert running.batch_size == 3 and not running.dense
    rows = [*histories, joiner]
    out = running.extend(torch.tensor([[50, 51], [52, 53], [54, 55]]))  # [3, 2, V]
    ref = full_logits(tiny_model, [r + [a, b] for r, (a, b) in zip(rows, [(50, 51), (52, 53), (54, 55)])])
    for b in range(3):
        assert torch.allclose(out[b], ref[b][-2:], atol=1e-4), b


@torch.no_grad()
def test_add_rows_into_and_from_an_empty_state(llama):
    """A lazy drafter's state holds nothing yet: joining it with a prefilled state (either way
    round) pads the empty rows fully, and their later tokens see only themselves."""
    empty = ModelState.empty(llama, 1)
    full, _ = ModelState.prefill(llama, torch.tensor([ROWS[2]]))
    empty.add_rows(full)  # [empty row, ROWS[2]]
    assert empty.ids.shape == (2, len(ROWS[2])) and empty.mask[0].sum() == 0 and empty.dense is False
    pending, pmask = left_pad([ROWS[0], [60]], 0)
    out = empty.extend(pending, token_mask=pmask, logits_to_keep=1)[:, -1]
    ref = full_logits(llama, [ROWS[0], ROWS[2] + [60]])
    assert torch.allclose(out[0], ref[0][-1], atol=1e-4)
    assert torch.allclose(out[1], ref[1][-1], atol=1e-4)
    both_empty = ModelState.empty(llama, 2)
    both_empty.add_rows(ModelState.empty(llama, 1))
    assert both_empty.ids.shape == (3, 0)
