"""EAGLE draft head: train-drafter end to end, the drafter reuses the target's hidden states
(checked against an offline pass), greedy == greedy (batch 1 and ragged 4), sampling through a
reduced-vocabulary head follows the target's distribution, the shipped head matches its card."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from decodekit import DecodeKitError, generate
from decodekit.cli import main
from decodekit.strategies.eagle import (
    EagleDrafter,
    EagleHead,
    additive_mask,
    capture_hidden,
    load_head,
    take_hidden,
)
from decodekit.strategies.eagle.train import acceptance_by_depth, training_prompts
from test_speculative import N_SAMPLES, TV_BOUND, _exact_marginals, _peaked, _tv_by_position

from conftest import CHAT_PROMPTS, chat_batch, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]  # ragged, one 1-token prompt


def _greedy(model, rows, n=20):
    return generate(model, rows, strategy="greedy", max_new_tokens=n, eos_token_id=[]).sequences


def _eagle(model, rows, drafter, n=20, **kw):
    return generate(model, rows, strategy="speculative", drafter=drafter, max_new_tokens=n, eos_token_id=[],
                    draft_policy="fixed", **kw)


# ---------------------------------------------------------------------------- train-drafter
@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle") / "head"
    rc = main(["train-drafter", "--model", str(tiny_model_dir), "--out", str(out), "--dtype", "float32",
               "--num_prompts", "3", "--max_new_tokens", "6", "--steps", "2", "--draft_vocab", "40",
               "--eval_prompts", "1"])
    assert rc == 0
    return out


def test_train_drafter_writes_head_and_card(trained_dir):
    assert sorted(p.name for p in trained_dir.iterdir()) == ["card.json", "model.safetensors"]
    card = json.loads((trained_dir / "card.json").read_text())
    assert card["head"]["draft_vocab"] == 40
    assert card["training"]["steps"] == 2 and card["data"]["prompts"] == 3
    assert card["data"]["generated_tokens"] > 0 and card["target_hash"].startswith("sha256:")
    assert len(card["evaluation"]["acceptance_by_depth"]) == card["evaluation"]["gamma"]
    digest = hashlib.sha256((trained_dir / "model.safetensors").read_bytes()).hexdigest()
    assert card["head_sha256"] == "sha256:" + digest


def test_trained_head_loads_and_drafts(trained_dir, tiny_model_dir):
    from decodekit.models import load_model

    model, tok = load_model(str(tiny_model_dir), dtype="float32")
    head = load_head(trained_dir, model)
    assert head.vocab_ids.numel() == 40 and head.shared.lm_rows.shape[0] == 40
    rows = [r[:6] for r in chat_batch(tok, ["hi", "Tell me a joke"])[0].tolist()]
    out = _eagle(model, rows, f"eagle:{trained_dir}", n=12, gamma=3)
    assert out.sequences == _greedy(model, rows, 12)
    assert sum(s.drafted for s in out.stats) > 0


def test_trained_head_drafts_for_the_int8_target(trained_dir, tiny_model_dir):
    """A head trained on the float target loads on its int8 copy (weights and activations as
    ``--dtype int8`` loads them) and drafts from the int8 LM head: greedy == int8 greedy."""
    from decodekit.models import load_model
    from decodekit.quant import quant_scheme

    model, tok = load_model(str(tiny_model_dir), dtype="int8")
    assert quant_scheme(model) == "int8"
    head = load_head(trained_dir, model)
    floats = model.model.embed_tokens.weight.dtype  # the activations (decodekit.quant.activations)
    torch.testing.assert_close(head.shared.lm_rows, model.lm_head.dequantize()[head.vocab_ids].to(floats))
    rows = [r[:6] for r in chat_batch(tok, ["hi", "Tell me a joke"])[0].tolist()]
    out = _eagle(model, rows, f"eagle:{trained_dir}", n=12, gamma=3)
    assert out.sequences == _greedy(model, rows, 12)
    assert sum(s.drafted for s in out.stats) > 0


@pytest.mark.needs("int8kernel")
def test_an_int8_target_drafts_with_an_int8_head(trained_dir, tiny_model_dir):
    """On decodekit's int8 kernel the drafter's head runs int8 weights (a quarter of the bytes
    per draft step); its logits stay close to the float head's, and output equals int8 greedy."""
    from decodekit.models import load_model
    from decodekit.quant import QuantLinear, quant_kernel

    model, tok = load_model(str(tiny_model_dir), dtype="int8")
    assert quant_kernel(model) == "decodekit"
    rows = [r[:6] for r in chat_batch(tok, ["hi", "Tell me a joke"])[0].tolist()]
    out = _eagle(model, rows, f"eagle:{trained_dir}", n=12, gamma=3)
    assert out.sequences == _greedy(model, rows, 12)
    assert sum(s.drafted for s in out.stats) > 0
    (head,) = model._decodekit_eagle.values()
    assert isinstance(head.layer.mlp.down_proj, QuantLinear) and head.shared.lm_int8 is not None
    float_head = load_head(trained_dir, model)
    hidden = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(head.logits(hidden), float_head.logits(hidden), rtol=0.05, atol=0.05)


def test_a_new_head_starts_from_the_quantized_targets_last_layer():
    from decodekit.quant import QuantLinear, quantize_model

    model = quantize_model(tiny_llama(0, layers=3), "int8", torch.float32)
    head = EagleHead(model)
    last = model.model.layers[-1].self_attn.q_proj
    assert isinstance(last, QuantLinear)
    torch.testing.assert_close(head.layer.self_attn.q_proj.weight, last.dequantize())
    assert _eagle(model, ROWS, EagleDrafter(model, head.eval()), n=16, gamma=3).sequences == _greedy(model, ROWS, 16)


def test_train_drafter_never_overwrites_a_result_silently(trained_dir, tiny_model_dir, capsys):
    before = (trained_dir / "model.safetensors").read_bytes()
    args = ["train-drafter", "--model", str(tiny_model_dir), "--out", str(trained_dir)]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished: kept as it is
    assert (trained_dir / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--draft_vocab", "1"], "draft_vocab must be >= 2"),
    (["--num_prompts", "0"], "num_prompts must be >= 1"),
    (["--model", "/no/such/model"], "model"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_train_drafter_bad_input_exits_2_before_loading(tmp_path, capsys, flags, message):
    assert main(["train-drafter", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_generate_refuses_an_eagle_dir_without_a_head(tmp_path, capsys):
    rc = main(["generate", "--prompt", "hi", "--strategy", "speculative", "--drafter", f"eagle:{tmp_path}"])
    assert rc == 2 and "holds no trained head" in capsys.readouterr().err


def test_training_prompts_keep_the_benchmark_suites_out():
    from decodekit.suites import SUITES, load_suite

    held_out = {r["prompt"] for name in SUITES for r in load_suite(name)}
    prompts = training_prompts(300, seed=0)
    assert len(set(prompts)) == 300 and not held_out & set(prompts)
    assert prompts == training_prompts(300, seed=0) != training_prompts(300, seed=1)


def test_acceptance_by_depth():
    # steps: drafted 3 accepted 3; drafted 3 accepted 1; drafted 2 accepted 0
    assert acceptance_by_depth([3, 3, 2], [3, 1, 0], 3) == [round(2 / 3, 4), 0.5, 1.0]


# ---------------------------------------------------------------------------- the drafter
class Recording(EagleDrafter):
    """Records, per propose, each row's history and the head's features for its first draft."""

    def __init__(self, *a):
        super().__init__(*a)
        self.log: list[tuple[list[int], torch.Tensor]] = []

    def propose(self, rows, k):
        self._rows = [list(r) for r in rows]
        return super().propose(rows, k)

    def _draw(self, hidden, rows):
        if self._rows is not None:
            self.log.extend(zip(self._rows, hidden.clone()))
            self._rows = None
        return super()._draw(hidden, rows)


@torch.inference_mode()
def _offline_features(model, head, sequence: list[int]) -> torch.Tensor:
    """The head run once over a whole sequence with the target's features of ONE full forward:
    ``[L-1, H]``, column ``j`` predicts ``f_{j+1}``."""
    capture_hidden(model)
    model(torch.tensor([sequence]))
    feats = take_hidden(model)  # [1, L, H]
    n = len(sequence) - 1
    mask = torch.ones(1, n, dtype=torch.long)
    pos = torch.arange(n)[None]
    return head(feats[:, :n], torch.tensor([sequence[1:]]), pos, additive_mask(mask, n, torch.float32))[0]


@pytest.mark.parametrize("first_target", [True, False])
def test_drafter_reuses_the_targets_hidden_states_exactly(first_target):
    """Every first draft's features equal the head over the target's features from one full
    forward: the verify forwards' hidden states are kept for the right positions, per row,
    through ragged acceptance and rows leaving the batch."""
    model = tiny_llama(0, layers=2)
    torch.manual_seed(5)
    head = EagleHead(model).eval()
    drafter = Recording(model, head)
    out = _eagle(model, ROWS, drafter, n=16, gamma=3, first_target=first_target)
    assert out.sequences == _greedy(model, ROWS, 16)
    full = [p + s for p, s in zip(ROWS, out.sequences)]
    offline = [_offline_features(model, head, s) for s in full]
    checked = [(h, f) for h, f in drafter.log if len(h) > 1]  # a 1-token prompt has no features yet
    assert len(checked) > 8
    for history, feats in checked:
        row = next(i for i, s in enumerate(full) if s[: len(history)] == history)
        torch.testing.assert_close(feats, offline[row][len(history) - 2], atol=1e-4, rtol=1e-4)


def test_drafter_takes_rows_of_a_running_batch():
    """Continuous batching: after ``add_rows`` every row drafts from the same features as a
    drafter of its own."""
    from decodekit.api import build_request
    from decodekit.cache import left_pad

    model = tiny_llama(0, layers=2)
    torch.manual_seed(5)
    head = EagleHead(model).eval()

    def prefilled(rows):
        ids, mask = left_pad(rows, 0)
        req = build_request(model, ids, mask, max_new_tokens=4)[2]
        drafter = Recording(model, head)  # hooks the target's final norm
        req.prefill()  # the target's prefill: the drafter takes its hidden states
        drafter.prefill(req)
        assert all(len(p) for p in drafter.pending)
        return drafter

    running = prefilled(ROWS[:2])
    running.add_rows(prefilled(ROWS[2:]))
    with torch.inference_mode():
        running.propose([r + [7] for r in ROWS], 2)
        for b, row in enumerate(ROWS):
            alone = prefilled([row])
            alone.propose([row + [7]], 2)
            torch.testing.assert_close(running.log[b][1], alone.log[0][1], atol=1e-4, rtol=1e-4)


def test_greedy_identical_batch_1_and_ragged_4_with_a_draft_vocabulary():
    model = tiny_llama(0, layers=3)
    want = _greedy(model, ROWS, 24)
    torch.manual_seed(1)
    head = EagleHead(model, torch.arange(0, 97, 3)).eval()
    drafter = EagleDrafter(model, head)
    for gamma in (1, 4):
        assert _eagle(model, ROWS, drafter, n=24, gamma=gamma).sequences == want
        assert [_eagle(model, [r], drafter, n=24, gamma=gamma).sequences[0] for r in ROWS] == want
    cost = generate(model, ROWS, strategy="speculative", drafter=drafter, max_new_tokens=24, eos_token_id=[],
                    draft_policy="cost", gamma=4)
    assert cost.sequences == want and drafter.step_cost(4) > 0


def test_setup_cost_is_feeding_the_widest_pending_row_beyond_one_pair():
    from conftest import recorded_feeds

    model = tiny_llama(0, layers=3)
    drafter = EagleDrafter(model, EagleHead(model, torch.arange(0, 97, 3)).eval())
    feed = recorded_feeds(2)
    drafter.pending = [torch.zeros(1, 8), torch.zeros(9, 8)]
    assert drafter.setup_cost(0, 2) == pytest.approx(feed(9) - feed(1)) and feed(9) > feed(1)
    drafter.pending = [torch.zeros(1, 8), torch.zeros(0, 8)]  # caught up: a step feeds one pair anyway
    assert drafter.setup_cost(0, 2) == 0.0


@pytest.mark.measured_costs
def test_the_heads_feed_costs_are_measured_without_touching_its_state():
    model = tiny_llama(0, layers=3)
    drafter = EagleDrafter(model, EagleHead(model, torch.arange(0, 97, 3)).eval())
    generate(model, ROWS[:1], strategy="speculative", drafter=drafter, max_new_tokens=4, eos_token_id=[])
    state = drafter.state
    curve = drafter.feed_costs(1)
    assert drafter.state is state and set(curve.points) == {1, 2, 4, 8, 16, 32}
    assert all(curve.points[a] <= curve.points[b] for a, b in ((1, 2), (2, 4), (4, 8), (8, 16), (16, 32)))
    assert drafter.step_cost(1) > 0


def test_sampling_through_a_reduced_vocabulary_head_follows_the_target():
    """q is zero outside the draft vocabulary; verification still reproduces the target's
    distribution (TV of the first three tokens' marginals against the exact ones)."""
    target = _peaked(0, 2, 12.0)
    prompt = [5, 6, 7]
    exact = _exact_marginals(target, prompt)
    torch.manual_seed(0)
    head = EagleHead(target, torch.tensor([0, 2, 3, 5, 7, 8, 11, 13, 14])).eval()
    drafter = EagleDrafter(target, head)
    out = _eagle(target, [prompt] * N_SAMPLES, drafter, n=3, gamma=3, temperature=1.0, seed=1)
    rate = sum(s.accepted for s in out.stats) / sum(s.drafted for s in out.stats)
    assert 0.05 < rate < 0.95  # both branches of the rejection sampler exercised
    outside = {1, 4, 6, 9, 10, 12, 15}
    assert any(s[1] in outside for s in out.sequences)  # recovered tokens outside the draft vocabulary
    assert max(_tv_by_position(out.sequences, exact)) < TV_BOUND


def test_shipped_head_refuses_another_target():
    model = tiny_llama(0)
    with pytest.raises(DecodeKitError, match="only for the bundled smollm2"):
        _eagle(model, ROWS, "eagle", n=4)


# ---------------------------------------------------------------------------- the shipped head
SHIPPED = Path(str(resources.files("decodekit").joinpath("drafters", "smollm2-135m-instruct")))


def test_shipped_head_matches_its_card():
    from decodekit.strategies.eagle.train import weights_hash

    card = json.loads((SHIPPED / "card.json").read_text())
    digest = hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()
    assert card["head_sha256"] == "sha256:" + digest
    assert card["target"] == "smollm2-135m-instruct"
    assert card["target_hash"] == weights_hash("smollm2-135m-instruct")
    assert card["head"]["draft_vocab"] and card["evaluation"]["acceptance_by_depth"][0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_shipped_head_greedy_identical_on_the_bundled_model(real_model, batch):
    model, tok = real_model
    prompts = CHAT_PROMPTS[:4]  # 4 prompts (each batch size): the bundled model is slow on a shared CPU
    accepted = 0
    for start in range(0, len(prompts), batch):
        ids, mask = chat_batch(tok, prompts[start: start + batch])
        want = generate(model, ids, mask, strategy="greedy", max_new_tokens=32).sequences
        out = generate(model, ids, mask, strategy="speculative", drafter="eagle", gamma=4,
                       draft_policy="fixed", max_new_tokens=32)
        assert out.sequences == want
        accepted += sum(s.accepted for s in out.stats)
    assert accepted > 0  # the head's drafts are really used
