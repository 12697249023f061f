"""decodekit's int8 weight-only kernel (decodekit.int8_kernel): against a float64 reference of
the same product, batch invariance (a row's output never depends on the rows beside it, so a
verify forward projects each token as the one-token forward does), the tails of odd sizes, the
switch back to PyTorch's kernel, and lossless strategies on it equal to its greedy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decodekit
from decodekit.int8_kernel import int8_kernel, int8_linear
from decodekit.quant import QuantLinear, quant_kernel, quantize_model
from decodekit.validation import DecodeKitError

from conftest import tiny_llama

pytestmark = [pytest.mark.needs("int8kernel"), pytest.mark.usefixtures("one_thread")]

SIZES = [(1, 576, 64), (3, 40, 13), (8, 32, 8), (9, 17, 100), (20, 5, 7)]  # (M, K, N): tails of 8 and 4


def operands(m: int, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)  # [M, K]
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)  # [N, K]
    scale = (torch.rand(n, generator=gen) / 50 + 1e-3).to(dtype)  # [N]
    return x, q, scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", SIZES)
def test_kernel_computes_the_scaled_product(m, k, n, dtype):
    x, q, scale = operands(m, k, n, dtype)
    out = int8_linear(x, q, scale)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = (x.double() @ q.double().t()) * scale.double()  # [M, N]
    # float32 accumulation, then one rounding to the output dtype
    step = 2.0 ** (-7 if dtype == torch.bfloat16 else -20)
    assert torch.allclose(out.double(), ref, rtol=step, atol=step * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", SIZES)
def test_each_row_is_computed_as_if_it_were_alone(m, k, n, dtype):
    x, q, scale = operands(m, k, n, dtype, seed=1)
    together = int8_linear(x, q, scale)
    for i in range(m):
        assert torch.equal(int8_linear(x[i:i + 1], q, scale), together[i:i + 1]), f"row {i} of {m}"
    # and in any company: the same rows inside a wider block, after others
    wider = int8_linear(torch.cat([x.flip(0), x]), q, scale)
    assert torch.equal(wider[m:], together)


def test_kernel_is_chosen_and_can_be_switched_off(monkeypatch):
    linear = nn.Linear(64, 32)
    assert QuantLinear(linear, "int8").kernel == "decodekit" == int8_kernel()
    monkeypatch.setenv("DECODEKIT_INT8_KERNEL", "torch")
    assert QuantLinear(linear, "int8").kernel == "torch"
    monkeypatch.setenv("DECODEKIT_INT8_KERNEL", "fast")
    with pytest.raises(DecodeKitError, match="DECODEKIT_INT8_KERNEL must be one of 'auto', 'torch'; got 'fast'"):
        QuantLinear(linear, "int8")


def test_a_bad_kernel_choice_fails_in_one_line_before_the_model_is_touched(monkeypatch):
    monkeypatch.setenv("DECODEKIT_INT8_KERNEL", "fast")
    monkeypatch.setattr("decodekit.models.local_model_dir", lambda *a: pytest.fail("touched the model"))
    with pytest.raises(DecodeKitError, match="DECODEKIT_INT8_KERNEL must be one of") as err:
        decodekit.load_model("smollm2-135m-instruct", dtype="int8")
    assert "\n" not in str(err.value)


def test_both_kernels_give_the_same_layer_within_rounding(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    ours = QuantLinear(linear, "int8")
    monkeypatch.setenv("DECODEKIT_INT8_KERNEL", "torch")
    theirs = QuantLinear(linear, "int8")
    x = torch.randn(2, 5, 96).bfloat16()
    a, b = ours(x), theirs(x)
    assert a.shape == b.shape == (2, 5, 40)
    assert torch.allclose(a.float(), b.float(), rtol=2 ** -6, atol=2 ** -6 * b.abs().max().item())


@pytest.mark.parametrize("strategy,options", [("prompt_lookup", {"gamma": 4}), ("jacobi", {"block_size": 4})])
def test_lossless_strategies_equal_greedy_on_the_kernel_in_bfloat16(strategy, options):
    """bfloat16 activations, what load_model uses for int8."""
    model = quantize_model(tiny_llama(seed=2), "int8", torch.bfloat16)
    assert quant_kernel(model) == "decodekit"
    prompts = [[5, 9, 11, 5, 9, 11, 5, 9], [7, 7, 20, 31, 7, 7, 20], [40, 41]]
    greedy = decodekit.generate(model, prompts, strategy="greedy", max_new_tokens=24, eos_token_id=[])
    drafted = decodekit.generate(model, prompts, strategy=strategy, max_new_tokens=24, eos_token_id=[],
                                  **options)
    assert drafted.sequences == greedy.sequences
