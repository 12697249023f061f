"""What ``decodekit bench`` runs: the strategy table, presets, suites and the checked config.

``ENTRIES`` says how to call ``decodekit.generate`` for each strategy and which
``model.generate`` call is its transformers equivalent (if any). Only strategies registered
in ``decodekit.STRATEGIES`` are run, so the bench grows as strategies land. Presets
(``--preset quick`` / ``foundation``) fill in settings; flags given on the command line win.
Everything is validated by ``resolve_config`` before any model is loaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from decodekit.models import DTYPES, LLAMA_CPP_DTYPES
from decodekit.suites import SUITES, load_suite
from decodekit.validation import DecodeKitError, check_choice, check_int

__all__ = ["BenchEntry", "ENTRIES", "PRESETS", "SUITES", "BenchConfig", "resolve_config", "load_suite"]

DRAFTER = "<drafter>"  # placeholder in the table: the bench's --drafter (default layers:N)


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class BenchEntry:
    """One strategy: ``decodekit.generate(strategy=name, **options)`` and, if transformers
    has it, ``model.generate(**hf)``. Whether its output must equal greedy decoding
    (``lossless``) and whether it drafts come from the strategy's registry record."""

    name: str
    options: dict
    hf: dict | None = None
    hf_batch1_only: bool = False  # transformers' assisted generation refuses batch > 1

    @property
    def lossless(self) -> bool:
        from decodekit.strategies import STRATEGIES

        return STRATEGIES[self.name].lossless

    @property
    def drafts(self) -> bool:
        """Reports acceptance and is swept over --gammas: its options have a draft length."""
        from decodekit.strategies import STRATEGIES

        return any(name == "gamma" for name, _, _ in STRATEGIES[self.name].options.specs())


SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.9}

ENTRIES: list[BenchEntry] = [
    BenchEntry("greedy", {}, hf={"do_sample": False}),
    BenchEntry("sample", {**SAMPLING, "seed": 0}, hf={"do_sample": True, **SAMPLING}),
    BenchEntry("beam", {"num_beams": 4}, hf={"num_beams": 4, "do_sample": False}),
    BenchEntry("speculative", {"drafter": DRAFTER, "gamma": 5},
               hf={"assistant_model": DRAFTER, "num_assistant_tokens": 5, "do_sample": False},
               hf_batch1_only=True),
    BenchEntry("ngram", {"gamma": 5}),
    BenchEntry("prompt_lookup", {"gamma": 5},
               hf={"prompt_lookup_num_tokens": 5, "do_sample": False},
               hf_batch1_only=True),
    BenchEntry("eis", {"top_k": 5, "lookahead_steps": 3}),
    BenchEntry("jacobi", {"block_size": 16}),
    BenchEntry("refine", {"add_eos_length": 16, "refine_iter": 2}),
]
ENTRY_BY_NAME = {e.name: e for e in ENTRIES}

SUITE_CHOICES = [*SUITES, "all"]
LLAMA_CPP = "llama.cpp"  # a dtype (decodekit on the llama.cpp backend: the GGUF's own weights) and a peer
# float32, bfloat16, float16, int8, int4 (weight-only, CPU), llama.cpp (the GGUF as it is), llama.cpp:q4_0 /
# llama.cpp:q8_0 (the GGUF requantized by llama.cpp: its batched CPU kernels take these types)
DTYPE_CHOICES = [*DTYPES, LLAMA_CPP, *(f"{LLAMA_CPP}:{t}" for t in LLAMA_CPP_DTYPES)]


def is_llama_cpp(dtype: str) -> bool:
    """A dtype that runs decodekit on the llama.cpp backend (``llama.cpp`` or ``llama.cpp:q4_0``...)."""
    return dtype == LLAMA_CPP or dtype.startswith(LLAMA_CPP + ":")


def gguf_type(dtype: str) -> str | None:
    """``llama.cpp:q4_0`` -> ``q4_0`` (the requantization); ``llama.cpp`` -> None (the GGUF as it is)."""
    return dtype.split(":", 1)[1] if ":" in dtype else None


def peer_dtype(dtypes: list[str]) -> str:
    """The cells llama.cpp's own rows go in (and whose GGUF they run): the first llama.cpp dtype."""
    return next((d for d in dtypes if is_llama_cpp(d)), LLAMA_CPP)
PEER_CHOICES = [LLAMA_CPP]
# llama.cpp's own implementations of our strategies (peer rows): name -> Llama draft model options
PEER_STRATEGIES = {"greedy": None, "prompt_lookup": {"num_pred_tokens": 5}}

# Settings a preset changes; anything given on the command line wins.
DEFAULTS = dict(strategies=None, suite="all", num_prompts=2, batch_sizes="1,4", dtypes="float32",
                trials=3, max_new_tokens=32, gammas="2,8", ignore_eos=False)
PRESETS = {
    "default": {},
    "quick": dict(num_prompts=1, batch_sizes="1", trials=1, max_new_tokens=24, gammas=""),
    # Issue 2's question: our greedy vs model.generate vs the bare floor, fixed lengths.
    "foundation": dict(strategies="greedy", suite="chat", num_prompts=8, batch_sizes="1,8",
                       dtypes="float32,bfloat16", max_new_tokens=32, gammas="", ignore_eos=True),
}


def available_entries() -> list[BenchEntry]:
    """The table rows whose strategy is registered in ``decodekit.STRATEGIES``."""
    from decodekit.strategies import STRATEGIES

    return [e for e in ENTRIES if e.name in STRATEGIES]


# ---------------------------------------------------------------------------- the config
@dataclass
class BenchConfig:
    model: str | None
    strategies: list[str]
    suites: list[str]
    num_prompts: int
    batch_sizes: list[int]
    dtypes: list[str]
    trials: int
    max_new_tokens: int
    gammas: list[int]
    drafter: str
    ignore_eos: bool
    transformers: bool
    threads: int | None
    clock: str
    device: str
    output_dir: Path
    preset: str
    peers: list[str] = ()  # "llama.cpp": llama.cpp's own greedy / prompt lookup as rows


def _int_list(name: str, text: str, min_value: int) -> list[int]:
    values = []
    for part in [p for p in str(text).split(",") if p.strip()]:
        try:
            value = int(part)
        except ValueError:
            raise DecodeKitError(f"{name} must be comma-separated integers, got {text!r}") from None
        values.append(check_int(name, value, min_value=min_value))
    return values


def _name_list(name: str, text: str, allowed: list[str]) -> list[str]:
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    if not names:
        raise DecodeKitError(f"{name} must name at least one of {', '.join(allowed)}")
    for n in names:
        check_choice(name, n, allowed)
    return names


def _strategies(text: str | None) -> list[str]:
    """Every available strategy (``None``), or the named ones, which must be available."""
    available = [e.name for e in available_entries()]
    if text is None:
        return available
    strategies = _name_list("strategies", text, [e.name for e in ENTRIES])
    missing = [s for s in strategies if s not in available]
    if missing:
        raise DecodeKitError(f"strategies {', '.join(missing)} are not available in this "
                             f"decodekit (available: {', '.join(available)})")
    return strategies


def _check_machine_args(args: argparse.Namespace) -> Path:
    """Output directory, device, clock and threads; returns the output directory."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DecodeKitError(f"output_dir {str(output_dir)!r} is a file; give a directory")
    check_choice("device", args.device, ["cpu", "cuda"])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DecodeKitError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
    check_choice("clock", args.clock, ["wall", "cpu"])
    if args.threads is not None:
        check_int("threads", args.threads, min_value=1)
    return output_dir


def _llama_cpp_args(args: argparse.Namespace, dtypes_text: str) -> tuple[str, list[str]]:
    """``--backend llama.cpp`` (= ``--dtypes llama.cpp``) and ``--peers llama.cpp``: checked
    (GGUF model, llama-cpp-python installed) before anything loads. Returns the dtypes text
    and the peers."""
    from decodekit.models import check_backend

    backend = getattr(args, "backend", None) or "torch"
    check_choice("backend", backend, ["torch", LLAMA_CPP])
    if backend == LLAMA_CPP:
        if args.dtypes is not None and args.dtypes.strip() != LLAMA_CPP:
            raise DecodeKitError("--backend llama.cpp runs the GGUF's own weights: give either it or --dtypes")
        dtypes_text = LLAMA_CPP
    peers = [p.strip() for p in (getattr(args, "peers", None) or "").split(",") if p.strip()]
    for peer in peers:
        check_choice("peers", peer, PEER_CHOICES)
    if peers or any(is_llama_cpp(d.strip()) for d in dtypes_text.split(",")):
        check_backend(LLAMA_CPP, args.model, param="model")
    return dtypes_text, peers


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """Apply the preset, then check every argument (no model is touched here)."""
    preset = "quick" if getattr(args, "quick", False) else args.preset
    check_choice("preset", preset, PRESETS)
    value = {k: getattr(args, k, None) for k in DEFAULTS}
    value = {k: v if v is not None else PRESETS[preset].get(k, DEFAULTS[k]) for k, v in value.items()}
    strategies = _strategies(value["strategies"])
    check_choice("suite", value["suite"], SUITE_CHOICES)
    output_dir = _check_machine_args(args)
    batch_sizes = _int_list("batch_sizes", value["batch_sizes"], 1)
    if not batch_sizes:
        raise DecodeKitError("batch_sizes must list at least one batch size >= 1")
    value["dtypes"], peers = _llama_cpp_args(args, value["dtypes"])
    return BenchConfig(
        model=args.model,
        strategies=strategies,
        suites=list(SUITES) if value["suite"] == "all" else [value["suite"]],
        num_prompts=check_int("num_prompts", value["num_prompts"], min_value=1),
        batch_sizes=sorted(set(batch_sizes)),
        dtypes=_name_list("dtypes", value["dtypes"], DTYPE_CHOICES),
        trials=check_int("trials", value["trials"], min_value=1),
        max_new_tokens=check_int("max_new_tokens", value["max_new_tokens"], min_value=1),
        gammas=_int_list("gammas", value["gammas"], 1),
        drafter=args.drafter,
        ignore_eos=bool(value["ignore_eos"]),
        transformers=not args.no_transformers,
        threads=args.threads,
        clock=args.clock,
        device=args.device,
        output_dir=output_dir,
        preset=preset,
        peers=peers,
    )
