"""Weight-only int8/int4 models (decodekit.quant): the kernels against dequantized-weight
references, every lossless strategy against greedy on the quantized model, bad dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import decodekit
from decodekit.quant import QuantLinear, activations, quant_scheme, quantize_model, unpack_int4
from decodekit.validation import DecodeKitError

from conftest import CHAT_PROMPTS, chat_batch, hf_new_tokens, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSLESS = [
    ("speculative", {"drafter": "layers:1", "gamma": 3}),
    ("ngram", {"gamma": 3}),
    ("prompt_lookup", {"gamma": 3}),
    ("jacobi", {"block_size": 4}),
]


def tiny_llama_int4(seed: int = 0):
    """A tiny Llama whose every Linear size is a multiple of 32 (the int4 kernel's rule)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=3, pad_token_id=0, bos_token_id=1, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 3, 0
    return model


def dequantized_reference(model):
    """An independent copy of a quantized model: each QuantLinear becomes a plain float32
    nn.Linear holding its dequantized weight; everything else in float32."""
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, QuantLinear):
            linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            linear.weight.data = mod.dequantize()
            if mod.bias is not None:
                linear.bias.data = mod.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, linear)
    return ref.float()


def rows(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 97, (k,), generator=gen).tolist() for k in (5, 9, 3, 12)[:n]]


@pytest.fixture(scope="module")
def int8_tiny():
    return quantize_model(tiny_llama(seed=1), "int8", torch.float32)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantlinear_matches_its_dequantized_weight(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(96, 64, bias=True)
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)]:
        q = QuantLinear(linear, scheme, dtype)
        x = torch.randn(2, 3, 96, dtype=dtype)
        ref = nn.functional.linear(x.float(), q.dequantize(), q.bias.float())  # [2, 3, 64]
        assert (q(x).float() - ref).abs().max() < tol
        step = 2 * linear.weight.abs().max() / (254 if scheme == "int8" else 15)
        assert (q.dequantize() - linear.weight).abs().max() <= step / 2 + 1e-2 * step


@pytest.mark.parametrize("shape", [(96, 64), (64, 32), (48, 96), (160, 128)])
def test_int4_unpack_inverts_the_cpu_packing(shape):
    """The packed layout differs by CPU kind (rows interleaved by 32 on AVX2, 64 on AVX512):
    unpacking reads it from PyTorch, so it holds under either ATEN_CPU_CAPABILITY."""
    codes = torch.randint(0, 16, shape, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_int4(packed), codes.long())


@pytest.mark.parametrize("scheme,make", [("int8", tiny_llama), ("int4", tiny_llama_int4)])
def test_greedy_equals_a_dequantized_reference(scheme, make):
    model = quantize_model(make(seed=2), scheme, torch.float32)
    assert quant_scheme(model) == scheme
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme == "int8"  # the head: int8
    ref = dequantized_reference(model)
    prompts = rows(4)
    ours = decodekit.generate(model, prompts, max_new_tokens=20, eos_token_id=[])
    theirs = decodekit.generate(ref, prompts, max_new_tokens=20, eos_token_id=[])
    assert ours.sequences == theirs.sequences
    original = make(seed=2).model.layers[0].mlp.up_proj.weight
    assert not torch.equal(ref.model.layers[0].mlp.up_proj.weight, original)  # the weights did change


def test_tied_head_keeps_the_float_embedding():
    model = tiny_llama(seed=4)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2
    table = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, "int8", torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, table)
    assert (model.lm_head.dequantize() - table).abs().max() <= table.abs().max() / 127


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("strategy,options", LOSSLESS, ids=[s for s, _ in LOSSLESS])
def test_lossless_strategies_equal_greedy_on_int8(int8_tiny, strategy, options, batch):
    prompts = [p * 3 for p in rows(batch, seed=5)]  # repeats: the n-gram drafters find drafts
    greedy = decodekit.generate(int8_tiny, prompts, max_new_tokens=24, eos_token_id=[])
    out = decodekit.generate(int8_tiny, prompts, strategy=strategy, max_new_tokens=24, eos_token_id=[],
                             **options)
    assert out.sequences == greedy.sequences


@pytest.mark.parametrize("strategy,options", LOSSLESS, ids=[s for s, _ in LOSSLESS])
def test_lossless_strategies_equal_greedy_on_int4_bf16(strategy, options):
    model = quantize_model(tiny_llama_int4(seed=6), "int4", torch.bfloat16)
    prompts = [p * 3 for p in rows(4, seed=7)]
    greedy = decodekit.generate(model, prompts, max_new_tokens=16, eos_token_id=[])
    out = decodekit.generate(model, prompts, strategy=strategy, max_new_tokens=16, eos_token_id=[], **options)
    assert out.sequences == greedy.sequences


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="int3"), "dtype"),
    (dict(dtype="int8", device="cuda:0"), "dtype 'int8' runs on the CPU only"),
    (dict(dtype="int4", device="cuda"), "dtype 'int4' runs on the CPU only"),
])
def test_bad_dtypes_fail_in_one_line_before_loading(monkeypatch, kwargs, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reach the kernel's device rule
    monkeypatch.setattr("decodekit.models.local_model_dir", lambda *a: pytest.fail("touched the model"))
    with pytest.raises(DecodeKitError, match=match) as err:
        decodekit.load_model("smollm2-135m-instruct", **kwargs)
    assert "\n" not in str(err.value)


def test_int4_on_a_shape_the_kernel_cannot_take_fails_before_the_weights_load(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM as Auto

    monkeypatch.setattr(Auto, "from_pretrained", lambda *a, **k: pytest.fail("loaded the weights"))
    with pytest.raises(DecodeKitError, match=r"int4.*k_proj is 32->16.*use dtype 'int8'") as err:
        decodekit.load_model(str(tiny_model_dir), dtype="int4")
    assert "\n" not in str(err.value)


def test_load_model_int8_from_a_directory(tiny_model_dir):
    model, tokenizer = decodekit.load_model(str(tiny_model_dir), dtype="int8")
    assert quant_scheme(model) == "int8" and model.model.embed_tokens.weight.dtype == activations("int8")
    ids, mask = chat_batch(tokenizer, CHAT_PROMPTS[:2])
    out = decodekit.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[])
    assert out.sequences == hf_new_tokens(model, ids, mask, max_new_tokens=8, do_sample=False,
                                          eos_token_id=None)


def test_cli_and_bench_offer_the_quantized_dtypes(capsys, int8_tiny):
    from decodekit.bench.config import DTYPE_CHOICES
    from decodekit.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "int8 | int4" in capsys.readouterr().out
    assert {"int8", "int4"} <= set(DTYPE_CHOICES)
    assert quant_scheme(int8_tiny) == "int8"  # the records' stats.dtype


@pytest.mark.slow
def test_real_model_int8_greedy_equals_reference_and_transformers(real_model):
    model, tokenizer = real_model
    quant = quantize_model(copy.deepcopy(model), "int8", torch.float32)
    ref = dequantized_reference(quant)
    ids, mask = chat_batch(tokenizer, CHAT_PROMPTS[:3])
    ours = decodekit.generate(quant, ids, mask, max_new_tokens=12)
    assert ours.sequences == decodekit.generate(ref, ids, mask, max_new_tokens=12).sequences
    shipped, _ = decodekit.load_model(dtype="int8")  # as users load it (quant.activations)
    out = decodekit.generate(shipped, ids, mask, max_new_tokens=12)
    assert out.sequences == hf_new_tokens(shipped, ids, mask, max_new_tokens=12, do_sample=False)
