"""GenerateParams: generate's parameters checked without a model, transformers' GenerationConfig
mapped onto them (transformers' generate as the oracle), and a processor knob registered in
one place reaching the API, the CLI and the server."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as tlp

import decodekit
from decodekit import DecodeKitError, GenerateParams, build_request, generate
from decodekit.processors import KNOBS, Knob, SuppressTokens
from decodekit.specs import Spec
from test_serve_engine import Collect

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, 97, (n,), generator=g).tolist() for n in (5, 9, 3)]
    return decodekit.left_pad(rows, PAD)


def hf_rows(model, ids, mask, config: GenerationConfig) -> list[list[int]]:
    """transformers' new tokens per row (no EOS in these configs: every row runs to the end)."""
    out = model.generate(ids, attention_mask=mask, generation_config=config, pad_token_id=PAD)
    return out[:, ids.shape[1]:].tolist()


# ---------------------------------------------------------------------------- model-free checks
def test_params_are_checked_without_a_model():
    params = GenerateParams.from_kwargs(strategy="prompt_lookup", gamma=3, repetition_penalty=1.2,
                                        max_new_tokens=9)
    assert params.strategy.name == "prompt_lookup" and params.options.gamma == 3
    assert params.knobs == {"repetition_penalty": 1.2} and params.max_new_tokens == 9
    for bad, match in [(dict(gamma=0, strategy="prompt_lookup"), "gamma"), (dict(top_k=0), "top_k"),
                       (dict(strategy="fastest"), "strategy"), (dict(seed=-1), "seed"),
                       (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"),
                       (dict(frobnicate=1), "unknown option")]:
        with pytest.raises(DecodeKitError, match=match) as err:
            GenerateParams.from_kwargs(**bad)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- GenerationConfig
def test_generation_config_greedy_with_penalties_equals_transformers():
    model = tiny_llama(seed=1)
    ids, mask = batch()
    config = GenerationConfig(do_sample=False, max_new_tokens=10, repetition_penalty=1.4,
                              no_repeat_ngram_size=2, eos_token_id=None)
    out = generate(model, ids, mask, generation_config=config)
    assert out.sequences == hf_rows(model, ids, mask, config)
    assert out.sequences != generate(model, ids, mask, max_new_tokens=10, eos_token_id=None).sequences


@pytest.mark.parametrize("lp, es", [(1.0, False), (0.5, True)])
def test_generation_config_beam_equals_transformers(lp, es):
    model = tiny_llama(seed=2)
    ids, mask = batch(1)
    config = GenerationConfig(num_beams=3, length_penalty=lp, early_stopping=es, max_new_tokens=8,
                              eos_token_id=None)
    assert generate(model, ids, mask, generation_config=config).sequences == hf_rows(model, ids, mask, config)


def test_generation_config_sampling_has_transformers_law():
    """The processed distribution equals transformers' warpers on the same logits (same law)."""
    model = tiny_llama(seed=3)
    ids, mask = batch(2)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.02,
                              repetition_penalty=1.2, max_new_tokens=4)
    strategy, _, request = build_request(model, ids, mask, generation_config=config)
    assert strategy.name == "sample"
    logits = torch.randn(ids.shape[0], model.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    ours = request.processor.distribution(request.scores(logits))
    hf = logits.clone()
    history = ids.masked_fill(mask == 0, PAD)
    for proc in (tlp.RepetitionPenaltyLogitsProcessor(1.2), tlp.TemperatureLogitsWarper(0.7),
                 tlp.TopKLogitsWarper(20), tlp.TopPLogitsWarper(0.9), tlp.MinPLogitsWarper(0.02)):
        hf = proc(history, hf)
    torch.testing.assert_close(ours, torch.softmax(hf, -1), atol=1e-6, rtol=1e-5)


def test_keywords_win_over_the_config_and_unsupported_fields_are_one_line_errors():
    model = tiny_llama(seed=1)
    ids, mask = batch()
    config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=None)
    assert len(generate(model, ids, mask, generation_config=config, max_new_tokens=3).sequences[0]) == 3
    for bad, field in [(GenerationConfig(diversity_penalty=0.5, num_beams=4, num_beam_groups=2), "diversity"),
                       (GenerationConfig(max_length=30), "max_length"),
                       (GenerationConfig(num_beams=2, do_sample=True), "beam sampling"),
                       (GenerationConfig(num_assistant_tokens=3), "num_assistant_tokens")]:
        with pytest.raises(DecodeKitError, match=field) as err:
            generate(model, ids, mask, generation_config=bad)
        assert "\n" not in str(err.value)


def test_prompt_lookup_from_the_config_equals_transformers():
    model = tiny_llama(seed=4)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    config = GenerationConfig(do_sample=False, prompt_lookup_num_tokens=3, max_new_tokens=8, eos_token_id=None)
    strategy, opts, _ = build_request(model, ids, generation_config=config)
    assert strategy.name == "prompt_lookup" and opts.gamma == 3
    assert generate(model, ids, generation_config=config).sequences == hf_rows(model, ids, None, config)


# ---------------------------------------------------------------------------- a new knob
@pytest.fixture
def toy_knob(monkeypatch):
    """``ban_token``: one Knob (its typed spec and its step), registered in one place."""
    knob = Knob("ban_token", Spec(int, "never generate this token id", min=0),
                step=lambda value, knobs, eos: SuppressTokens([value]))
    monkeypatch.setitem(KNOBS, "ban_token", knob)
    return knob


def test_a_new_knob_works_in_the_api_the_cli_and_the_server(toy_knob, tiny_model_dir, bundled_tokenizer,
                                                            tmp_path, capsys):
    model = tiny_llama(seed=5)
    prompt = [[5, 6, 7]]
    free = generate(model, prompt, max_new_tokens=6, eos_token_id=None).sequences[0]
    banned = free[0]
    out = generate(model, prompt, max_new_tokens=6, eos_token_id=None, ban_token=banned).sequences[0]
    assert banned not in out and out == generate(model, prompt, max_new_tokens=6, eos_token_id=None,
                                                 suppress_tokens=[banned]).sequences[0]
    with pytest.raises(DecodeKitError, match="ban_token must be >= 0"):
        generate(model, prompt, ban_token=-1)

    from decodekit.cli import main

    assert main(["generate", "--model_path", str(tiny_model_dir), "--prompt", "hi", "--ban_token", "-3",
                 "--output_file", str(tmp_path / "r.jsonl")]) == 2
    assert "ban_token must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()

    from decodekit.serve import Engine, EngineRequest
    from decodekit.serve.protocol import parse_chat

    body = {"messages": [{"role": "user", "content": "hi"}], "decoding": {"ban_token": banned}}
    params = parse_chat(body, bundled_tokenizer, "tiny").params
    assert params["ban_token"] == banned
    engine = Engine(model, None)
    engine.start()
    try:
        served = Collect()
        engine.submit(EngineRequest(prompt[0], dict(max_new_tokens=6, eos_token_id=None, ban_token=banned)), served)
        assert served.wait().error is None and served.tokens[0] == out
        refused = Collect()
        with pytest.raises(DecodeKitError, match="ban_token"):
            engine.submit(EngineRequest(prompt[0], dict(ban_token="x")), refused)
    finally:
        engine.stop()
