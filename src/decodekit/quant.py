"""Weight-only quantization of a model's Linear layers (``load_model(dtype="int8" | "int4")``).

Each ``nn.Linear`` (the LM head included) becomes a ``QuantLinear`` holding integer weights
and running PyTorch's own weight-only kernels; embeddings, norms and activations stay in
floating point. The embedding lookup keeps its float table even when the LM head was tied
to it: the head gets its own quantized copy.

- ``int8``: symmetric, one scale per output row: ``W[n, k] ~ q[n, k] * scale[n]``,
  ``q`` in -127..127; kernel: decodekit's own (``decodekit.int8_kernel``: flatter over the few
  rows of a verify forward, batch-invariant) where it builds, else ``aten._weight_int8pack_mm``.
- ``int4``: asymmetric, groups of 32 along the input (like GGUF's Q4_1 blocks):
  ``W[n, k] ~ (q[n, k] - 8) * scale[k // 32, n] + zero[k // 32, n]``, ``q`` in 0..15;
  kernel ``aten._weight_int4pack_mm_for_cpu`` (CPU only; both sizes a multiple of 32).
  The LM head stays int8 (as llama.cpp keeps ``output.weight`` finer): the bundled GGUF's
  body is Q4_1, which int4 groups of 32 recover up to the bf16 rounding of the scales, but
  its embedding table is finer, and int4 on it costs 9% relative weight error.

Activations (``activations(scheme)``): float32 for int8 on decodekit's kernel, which widens
every input to float32 anyway (float32 activations were as fast as bfloat16 ones there, and a
verify forward's logits then differ from the one-token forward's by float32 rounding, about
3e-5, instead of bfloat16's, up to 0.6, which flipped greedy near-ties); bfloat16 for int4 and
for PyTorch's int8 kernel, both 5-10x slower with float32 inputs on the 2-core AVX2 CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from decodekit.int8_kernel import int8_kernel, int8_linear
from decodekit.validation import DecodeKitError, check_choice

__all__ = ["QuantLinear", "quantize_model", "quant_scheme", "check_quant", "linear_plan", "SCHEMES",
           "unpack_int4", "int4_layout", "quant_kernel", "activations"]

SCHEMES = ("int8", "int4")
ACTIVATIONS = torch.bfloat16  # the activation dtype of PyTorch's weight-only kernels
GROUP = 32  # int4 group size along the input dimension (and the sizes int4 accepts)


def activations(scheme: str) -> torch.dtype:
    """The activation dtype ``load_model`` runs a ``scheme`` model in (see the module's notes)."""
    return torch.float32 if scheme == "int8" and int8_kernel() == "decodekit" else ACTIVATIONS


def check_quant(scheme: str, device: torch.device, plan: list[tuple[str, nn.Linear, str]] = ()) -> None:
    """One-line ``DecodeKitError`` when ``scheme`` cannot run on ``device`` or on a layer of
    ``plan`` (``linear_plan``'s list; a meta-device skeleton is enough)."""
    check_choice("dtype", scheme, SCHEMES)
    if device.type != "cpu":
        raise DecodeKitError(f"dtype {scheme!r} runs on the CPU only (PyTorch's CPU weight-only kernels); "
                             f"use --device cpu or a float dtype on {device.type}")
    int8_kernel()  # DECODEKIT_INT8_KERNEL is checked (and the kernel built) before any weights load
    for name, linear, layer_scheme in plan:
        out_f, in_f = linear.out_features, linear.in_features
        if layer_scheme == "int4" and (out_f % GROUP or in_f % GROUP):
            raise DecodeKitError(f"dtype 'int4' needs Linear sizes that are multiples of {GROUP}; this "
                                 f"model's {name} is {in_f}->{out_f}: use dtype 'int8'")


def linear_plan(model: nn.Module, scheme: str) -> list[tuple[str, nn.Linear, str]]:
    """``(name, linear, scheme)`` for every ``nn.Linear``: the LM head is int8 under int4."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, mod, "int8" if mod is head else scheme)
            for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def _quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q [N, K] int8, scale [N] in ``dtype``)."""
    lo, hi = torch.aminmax(weight, dim=1)  # [N]
    scale = (torch.maximum(-lo, hi).float() / 127).clamp(min=1e-12).to(dtype)  # [N], rounded first
    q = torch.div(weight.float(), scale.float()[:, None]).round_().clamp_(-127, 127)  # [N, K]
    return q.to(torch.int8), scale


def _quantize_int4(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (packed [N, K/2] uint8, scales_and_zeros [K/32, N, 2] in ``dtype``)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP, GROUP)  # [N, G, 32]
    lo, hi = torch.aminmax(w, dim=-1)  # [N, G]
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(dtype).float()  # [N, G], rounded to the kernel's dtype
    zero = (lo + 8 * scale).to(dtype).float()  # [N, G]: the value of code 8
    q = torch.sub(w, zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)  # [N, G, 32]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32), 1)  # [N, K/2]
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [G, N, 2]
    return packed, scales_and_zeros


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """packed [N, K/2] uint8 -> nibbles [N*K] int64: byte i's low nibble, then its high one."""
    wide = packed.long().flatten()  # [N*K/2]
    return torch.stack([wide & 15, wide >> 4], dim=-1).flatten()  # [N*K]


@functools.lru_cache(maxsize=16)
def int4_layout(n: int, k: int) -> torch.Tensor:
    """Where PyTorch's CPU int4 packing puts each code of an ``[n, k]`` matrix, read from
    PyTorch itself: ``source [N*K]`` int64, nibble ``j`` of the packed bytes holds code
    ``source[j]`` of the row-major codes. The layout depends on the kernels PyTorch picks at
    run time (rows interleaved in blocks of 32 on AVX2, 64 on AVX512), so it is never assumed:
    four packings of probe codes carry the 4-bit digits of every code's own index."""
    index = torch.arange(n * k)  # [N*K]
    source = torch.zeros(n * k, dtype=torch.long)  # [N*K]
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        probe = ((index >> shift) & 15).reshape(n, k).to(torch.int32)  # [N, K]: one digit each
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)  # [N, K/2]
        source |= _nibbles(packed) << shift
    return source


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed [N, K/2] uint8, as ``_convert_weight_to_int4pack_for_cpu`` made it on this
    machine -> codes [N, K] int64 in 0..15."""
    n, half = packed.shape
    codes = torch.empty(n * 2 * half, dtype=torch.long)  # [N*K]
    codes[int4_layout(n, 2 * half)] = _nibbles(packed)
    return codes.reshape(n, 2 * half)


class QuantLinear(nn.Module):
    """A Linear with int8 or int4 weights; ``forward`` takes ``x [..., K]`` in the scales'
    dtype and returns ``[..., N]``. ``weight`` keeps the Linear's leading size N."""

    def __init__(self, linear: nn.Linear, scheme: str, dtype: torch.dtype = ACTIVATIONS):
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, linear.in_features, linear.out_features
        self.kernel = int8_kernel() if scheme == "int8" else "torch"  # "decodekit" | "torch"
        quantize = _quantize_int8 if scheme == "int8" else _quantize_int4
        weight, scales = quantize(linear.weight.detach(), dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)  # int8 [N, K] | uint8 [N, K/2]
        self.scales = nn.Parameter(scales, requires_grad=False)  # [N] | [K/32, N, 2]
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [M, K]
        if self.kernel == "decodekit":
            out = int8_linear(flat, self.weight, self.scales)  # [M, N]
        elif self.scheme == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)  # [M, N]
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scales)  # [M, N]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` the kernel multiplies by (for references and checks)."""
        if self.scheme == "int8":
            return self.weight.float() * self.scales.float()[:, None]
        codes = unpack_int4(self.weight).float()  # [N, K]
        scale = self.scales[..., 0].float().t().repeat_interleave(GROUP, dim=1)  # [N, K]
        zero = self.scales[..., 1].float().t().repeat_interleave(GROUP, dim=1)  # [N, K]
        return (codes - 8) * scale + zero

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"kernel={self.kernel}")


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, activations: torch.dtype | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``QuantLinear`` (the LM head
    int8 under int4); quantize
    from the weights as they are (load float32 for the best precision). ``activations``:
    the dtype the rest of the model (embeddings, norms, the kernels' inputs) runs in;
    default: the model's current floating dtype. Buffers (rotary tables) are left as they are.
    """
    dtype = activations or next(p for p in model.parameters() if p.is_floating_point()).dtype
    plan = linear_plan(model, scheme)
    check_quant(scheme, next(model.parameters()).device, plan)
    for name, linear, layer_scheme in plan:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(linear, layer_scheme, dtype))
    for param in model.parameters():  # embeddings, norms: the activation dtype
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = False  # the head is its own quantized copy now
        model.config.dtype = dtype
    return model


def quant_scheme(model: nn.Module) -> str | None:
    """``"int8"`` / ``"int4"`` when ``model`` holds ``QuantLinear`` layers (the body's scheme,
    not the head's), else None."""
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantLinear)}
    return "int4" if "int4" in schemes else next(iter(schemes), None)


def quant_kernel(model: nn.Module) -> str | None:
    """The kernel of ``model``'s int8 layers (``"decodekit"`` / ``"torch"``), else None."""
    return next((m.kernel for m in model.modules() if isinstance(m, QuantLinear) and m.scheme == "int8"), None)
