"""``decodekit bench``: every strategy and transformers' ``generate()`` side by side.

The benchmark reads top to bottom:

1. ``ENTRIES``, the table of strategies: how to call ``decodekit.generate`` for each and
   which ``model.generate`` call is its transformers equivalent (if any). Only strategies
   registered in ``decodekit.STRATEGIES`` are run, so the bench grows as strategies land.
2. arguments and presets (``--preset quick`` / ``foundation``), validated before any
   model is loaded,
3. the machine card (versions, weight bytes, measured memory bandwidth, the implied
   floor in ms per token),
4. the runs: (strategy, implementation, dtype, batch size), each timed over every
   prompt of the chosen suites; trials are interleaved (trial-major) so that a noisy
   neighbour slows every run alike. A bare forward loop (prefill, then argmax + one
   token per forward, nothing else) gives the floor for each dtype and batch size,
5. summaries (tokens/s, ratios, forwards per token, acceptance, memory, identity with
   greedy, quality) and the report (``bench_report``: report.md, results.json, plots).

Ctrl-C stops the trials and writes what was measured so far.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from decodekit.validation import DecodeKitError, check_choice, check_int

__all__ = ["BenchEntry", "ENTRIES", "PRESETS", "SUITES", "add_arguments", "run", "resolve_config",
           "BenchConfig", "load_suite", "machine_card", "floor_generate", "run_bench"]

log = logging.getLogger(__name__)

DRAFTER = "<drafter>"  # placeholder in the table: the bench's --drafter (default layers:N)


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class BenchEntry:
    """One strategy: ``decodekit.generate(strategy=name, **options)`` and, if transformers
    has it, ``model.generate(**hf)``. ``lossless``: output must equal greedy decoding."""

    name: str
    options: dict
    hf: dict | None = None
    hf_batch1_only: bool = False  # transformers' assisted generation refuses batch > 1
    lossless: bool = False
    drafts: bool = False  # reports acceptance; swept over --gammas


SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.9}

ENTRIES: list[BenchEntry] = [
    BenchEntry("greedy", {}, hf={"do_sample": False}, lossless=True),
    BenchEntry("sample", {**SAMPLING, "seed": 0}, hf={"do_sample": True, **SAMPLING}),
    BenchEntry("beam", {"num_beams": 4}, hf={"num_beams": 4, "do_sample": False}),
    BenchEntry("speculative", {"drafter": DRAFTER, "gamma": 5},
               hf={"assistant_model": DRAFTER, "num_assistant_tokens": 5, "do_sample": False},
               hf_batch1_only=True, lossless=True, drafts=True),
    BenchEntry("ngram", {"gamma": 5}, lossless=True, drafts=True),
    BenchEntry("prompt_lookup", {"gamma": 5},
               hf={"prompt_lookup_num_tokens": 5, "do_sample": False},
               hf_batch1_only=True, lossless=True, drafts=True),
    BenchEntry("eis", {"top_k": 5, "lookahead_steps": 3}),
    BenchEntry("jacobi", {"block_size": 16}, lossless=True),
    BenchEntry("refine", {"add_eos_length": 16, "refine_iter": 2}),
]
ENTRY_BY_NAME = {e.name: e for e in ENTRIES}

SUITES = {"chat": "chat.jsonl", "grounded": "grounded.jsonl", "qa": "qa.jsonl"}
SUITE_CHOICES = [*SUITES, "all"]
DTYPE_CHOICES = ["float32", "bfloat16", "float16"]

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


# ---------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    def flag(name, **kw):
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*spellings, dest=name, **kw)

    flag("preset", default="default", help=f"one of {', '.join(PRESETS)} (flags given win)")
    flag("model", default=None, help="model name, HF dir or .gguf (default: the bundled model)")
    flag("strategies", default=None, help="comma list (default: every available strategy)")
    flag("suite", default=None, help=f"one of {', '.join(SUITE_CHOICES)} (default all)")
    flag("num_prompts", type=int, default=None, help="prompts taken from each suite (default 2)")
    flag("batch_sizes", default=None, help="comma list (default 1,4)")
    flag("dtypes", default=None, help="comma list of float32, bfloat16 (default float32)")
    flag("trials", type=int, default=None, help="interleaved trials (default 3)")
    flag("max_new_tokens", type=int, default=None, help="default 32")
    flag("gammas", default=None, help="draft lengths swept at batch 1 (default 2,8; '' = none)")
    flag("drafter", default="layers:24", help="speculative drafter: layers:N or a model (default layers:24)")
    flag("ignore_eos", action="store_const", const=True, default=None,
         help="decode exactly max_new_tokens per row (fixed-length throughput)")
    flag("no_transformers", action="store_true", help="skip transformers' generate() runs")
    flag("threads", type=int, default=None, help="torch threads (default: torch's choice)")
    flag("clock", default="wall", help="wall | cpu: cpu = this process's CPU seconds, steadier on a "
                                       "shared machine with --threads 1 (default wall)")
    flag("device", default="cpu", help="cpu | cuda (default cpu)")
    flag("output_dir", default="bench-results", help="where report.md, results.json, plots go")
    flag("quick", action="store_true", help="same as --preset quick (under 3 minutes)")


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


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """Apply the preset, then check every argument (no model is touched here)."""
    preset = "quick" if getattr(args, "quick", False) else args.preset
    check_choice("preset", preset, PRESETS)
    value = {k: getattr(args, k, None) for k in DEFAULTS}
    value = {k: v if v is not None else PRESETS[preset].get(k, DEFAULTS[k]) for k, v in value.items()}
    known = [e.name for e in ENTRIES]
    available = [e.name for e in available_entries()]
    if value["strategies"] is None:
        strategies = available
    else:
        strategies = _name_list("strategies", value["strategies"], known)
        missing = [s for s in strategies if s not in available]
        if missing:
            raise DecodeKitError(f"strategies {', '.join(missing)} are not available in this "
                                 f"decodekit (available: {', '.join(available)})")
    check_choice("suite", value["suite"], SUITE_CHOICES)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DecodeKitError(f"output_dir {str(output_dir)!r} is a file; give a directory")
    check_choice("device", args.device, ["cpu", "cuda"])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DecodeKitError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
    check_choice("clock", args.clock, ["wall", "cpu"])
    if args.threads is not None:
        check_int("threads", args.threads, min_value=1)
    batch_sizes = _int_list("batch_sizes", value["batch_sizes"], 1)
    if not batch_sizes:
        raise DecodeKitError("batch_sizes must list at least one batch size >= 1")
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
    )


# ---------------------------------------------------------------------------- suites
def load_suite(name: str) -> list[dict]:
    """The suite's records (``{"prompt": ..., "answer": [...]?}``) from decodekit/data."""
    check_choice("suite", name, SUITES)
    text = resources.files("decodekit").joinpath("data", SUITES[name]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Batch:
    suites: list[str]  # the suite of each row
    records: list[dict]
    prompt_ids: list[list[int]]
    ids: torch.Tensor  # [B, T] left padded
    mask: torch.Tensor  # [B, T]

    @property
    def suite(self) -> str:
        """The batch's suite, or "mixed" when its rows come from several suites."""
        return self.suites[0] if len(set(self.suites)) == 1 else "mixed"


def make_batches(tokenizer, cfg: BenchConfig, batch_size: int, pad_token_id: int) -> list[Batch]:
    """Every suite's first ``num_prompts`` prompts (chat template applied), suite after
    suite, cut into batches of ``batch_size`` rows."""
    from decodekit.cache import left_pad
    from decodekit.io import encode_prompts, iter_batches

    rows = []  # (suite, record, prompt ids)
    for suite in cfg.suites:
        records = load_suite(suite)[: cfg.num_prompts]
        ids = encode_prompts(tokenizer, [r["prompt"] for r in records], use_chat_template=True)
        rows += [(suite, rec, row) for rec, row in zip(records, ids, strict=True)]
    batches = []
    for chunk in iter_batches(rows, batch_size):
        ids, mask = left_pad([r for _, _, r in chunk], pad_token_id)
        batches.append(Batch([s for s, _, _ in chunk], [rec for _, rec, _ in chunk],
                             [r for _, _, r in chunk], ids.to(cfg.device), mask.to(cfg.device)))
    return batches


# ---------------------------------------------------------------------------- the card
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_bytes(model) -> int:
    """Bytes of the parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memory_bandwidth(device: str, mib: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` large-tensor copy, in GB/s (bytes read + bytes written)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def machine_card(models: dict, cfg: BenchConfig, model_name: str) -> dict:
    import transformers

    import decodekit

    bandwidth = memory_bandwidth(cfg.device)
    first = next(iter(models.values()))
    card = {
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
        "device": cfg.device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decodekit": decodekit.__version__,
        "model": model_name,
        "model_class": type(first).__name__,
        "parameters": sum(p.numel() for p in first.parameters()),
        "bandwidth_gb_s": round(bandwidth, 2),
        "weights": {},
    }
    for dtype, model in models.items():
        nbytes = weight_bytes(model)
        card["weights"][dtype] = {
            "bytes": nbytes,
            "floor_ms_per_token": round(nbytes / (bandwidth * 1e9) * 1000, 2),
        }
    return card


# ---------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak resident memory (CPU: RSS sampled every 20 ms; CUDA: max allocated), in MiB."""

    def __init__(self, device: str):
        self.device, self.peak_mib, self._stop = device, 0.0, threading.Event()

    def _rss(self) -> float:
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except ImportError:  # pragma: no cover - psutil is in the bench extra
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, self._rss())

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak_mib = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self._rss())


class ForwardCounter:
    """Counts calls of the target model itself (a drafter sharing its weights is a
    different module object and is not counted)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def _hook(self, module, args):
        if module is self.model:
            self.calls += 1

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


@torch.inference_mode()
def floor_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """The bare forward loop: prefill, then argmax + one token per forward with a
    DynamicCache; no EOS, no bookkeeping. Returns the greedy tokens per row."""
    from transformers import DynamicCache

    from decodekit.cache import cache_kwarg

    cache = {cache_kwarg(model): DynamicCache()}
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, T]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   logits_to_keep=1, **cache).logits  # [B, 1, V]
    pos = pos[:, -1:]  # [B, 1]
    out = []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        out.append(token)
        if step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        pos = pos + 1
        logits = model(input_ids=token, attention_mask=mask, position_ids=pos, use_cache=True,
                       **cache).logits
    return torch.cat(out, dim=1).tolist()


def _cut_at_eos(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


@dataclass
class Run:
    """One line of the report: a strategy, run by one implementation, at one dtype and
    batch size (``gamma`` set for the draft-length sweep)."""

    strategy: str
    impl: str  # "decodekit" | "transformers" | "floor"
    dtype: str
    batch_size: int
    options: dict
    gamma: int | None = None
    trials: list[dict] = field(default_factory=list)  # seconds, tokens, per-suite split
    sequences: list[list[int]] | None = None  # first trial, one per prompt
    spec: dict = field(default_factory=dict)  # forwards, drafted, accepted, histogram
    peak_rss_mib: float = 0.0
    error: str | None = None
    quality: dict = field(default_factory=dict)
    identical_to_greedy: str | None = None
    identical_to_transformers: str | None = None

    @property
    def key(self) -> str:
        g = f" gamma={self.gamma}" if self.gamma is not None else ""
        return f"{self.strategy}/{self.impl}{g} {self.dtype} b{self.batch_size}"

    def tokens_per_s(self) -> list[float]:
        return [t["tokens"] / t["seconds"] for t in self.trials if t["seconds"] > 0]

    def median_tokens_per_s(self) -> float | None:
        rates = self.tokens_per_s()
        return statistics.median(rates) if rates else None


@dataclass
class Context:
    """What the runners need: models, tokenizer, batches per batch size, config."""

    cfg: BenchConfig
    models: dict
    tokenizer: object
    batches: dict  # batch_size -> list[Batch]
    eos: list[int]
    pad: int
    assistants: dict = field(default_factory=dict)  # dtype -> drafter model for transformers


def _drafter_model(model, drafter: str):
    """The drafter as a model object, for transformers' ``assistant_model``."""
    if drafter.startswith("layers:"):
        from decodekit.strategies.speculative import early_exit_model

        view = early_exit_model(model, int(drafter.split(":", 1)[1]))
    else:
        from decodekit.models import load_model

        view = load_model(drafter, dtype=next(model.parameters()).dtype, device=str(model.device))[0]
    view.generation_config = copy.deepcopy(model.generation_config)
    return view


def call_decodekit(ctx: Context, run: Run, batch: Batch, max_new_tokens: int):
    import decodekit

    options = {k: (ctx.cfg.drafter if v == DRAFTER else v) for k, v in run.options.items()}
    out = decodekit.generate(
        ctx.models[run.dtype], batch.ids, batch.mask, strategy=run.strategy,
        max_new_tokens=max_new_tokens, eos_token_id=[] if ctx.cfg.ignore_eos else ctx.eos,
        pad_token_id=ctx.pad, tokenizer=ctx.tokenizer, **options,
    )
    return out.sequences, out.stats


@torch.inference_mode()
def call_transformers(ctx: Context, run: Run, batch: Batch, max_new_tokens: int):
    model = ctx.models[run.dtype]
    kwargs = dict(run.options)
    extra = {}
    if kwargs.get("assistant_model") == DRAFTER:
        if run.dtype not in ctx.assistants:
            ctx.assistants[run.dtype] = _drafter_model(model, ctx.cfg.drafter)
        extra["assistant_model"] = ctx.assistants[run.dtype]
        extra["assistant_model"].generation_config.update(
            num_assistant_tokens=kwargs.pop("num_assistant_tokens"),
            num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
        kwargs.pop("assistant_model")
    gen = copy.deepcopy(model.generation_config)
    gen.update(max_new_tokens=max_new_tokens, pad_token_id=ctx.pad,
               eos_token_id=None if ctx.cfg.ignore_eos else ctx.eos, **kwargs)
    if gen.do_sample:
        torch.manual_seed(0)
    out = model.generate(batch.ids, attention_mask=batch.mask, generation_config=gen, **extra)
    rows = out[:, batch.ids.shape[1]:].tolist()
    return (rows if ctx.cfg.ignore_eos else _cut_at_eos(rows, set(ctx.eos))), None


def call_floor(ctx: Context, run: Run, batch: Batch, max_new_tokens: int):
    return floor_generate(ctx.models[run.dtype], batch.ids, batch.mask, max_new_tokens), None


CALLS = {"decodekit": call_decodekit, "transformers": call_transformers, "floor": call_floor}


def _record_spec(run: Run, stats, calls: int, tokens_per_row: float) -> None:
    """Forward counts and draft statistics of one batch (first trial)."""
    spec = run.spec
    spec["forwards"] = spec.get("forwards", 0) + calls
    spec["tokens_per_row"] = spec.get("tokens_per_row", 0.0) + tokens_per_row
    for stat in stats or []:
        if stat.drafted or stat.accept_lengths:
            spec["drafted"] = spec.get("drafted", 0) + stat.drafted
            spec["accepted"] = spec.get("accepted", 0) + stat.accepted
            spec["verify_steps"] = spec.get("verify_steps", 0) + len(stat.accept_lengths)
            hist = Counter(spec.get("histogram", {}))
            hist.update(stat.accept_lengths)
            spec["histogram"] = dict(sorted(hist.items()))


def measure(ctx: Context, run: Run, first_trial: bool) -> None:
    """Time one run over every batch of its batch size; append one trial."""
    call = CALLS[run.impl]
    model = ctx.models[run.dtype]
    clock = time.process_time if ctx.cfg.clock == "cpu" else time.perf_counter
    trial = {"seconds": 0.0, "tokens": 0, "suites": {}}
    sequences = []
    with PeakMemory(ctx.cfg.device) as mem:
        for batch in ctx.batches[run.batch_size]:
            with ForwardCounter(model) as counter:
                _sync(ctx.cfg.device)
                t0 = clock()
                rows, stats = call(ctx, run, batch, ctx.cfg.max_new_tokens)
                _sync(ctx.cfg.device)
                seconds = clock() - t0
            tokens = sum(len(r) for r in rows)
            trial["seconds"] += seconds
            trial["tokens"] += tokens
            suite = trial["suites"].setdefault(batch.suite, {"seconds": 0.0, "tokens": 0})
            suite["seconds"] += seconds
            suite["tokens"] += tokens
            sequences.extend(rows)
            if first_trial:
                _record_spec(run, stats, counter.calls, tokens / len(rows))
    run.peak_rss_mib = max(run.peak_rss_mib, mem.peak_mib)
    run.trials.append(trial)
    if first_trial:
        run.sequences = sequences


# ---------------------------------------------------------------------------- the plan
def plan_runs(cfg: BenchConfig) -> list[Run]:
    """Every (strategy, implementation, dtype, batch size), the floor, the gamma sweep."""
    runs = []
    for dtype in cfg.dtypes:
        for bs in cfg.batch_sizes:
            runs.append(Run("floor", "floor", dtype, bs, {}))
            for name in cfg.strategies:
                entry = ENTRY_BY_NAME[name]
                runs.append(Run(name, "decodekit", dtype, bs, dict(entry.options)))
                if cfg.transformers and entry.hf is not None and (bs == 1 or not entry.hf_batch1_only):
                    runs.append(Run(name, "transformers", dtype, bs, dict(entry.hf)))
    sweep_bs, sweep_dtype = cfg.batch_sizes[0], cfg.dtypes[0]
    for name in cfg.strategies:
        entry = ENTRY_BY_NAME[name]
        default_gamma = entry.options.get("gamma")
        for gamma in cfg.gammas if entry.drafts else []:
            if gamma != default_gamma:
                runs.append(Run(name, "decodekit", sweep_dtype, sweep_bs,
                                {**entry.options, "gamma": gamma}, gamma=gamma))
    return runs


def _warm_up(ctx: Context, runs: list[Run]) -> None:
    """One short call per run (lazy imports, allocator, one-time cost curves); a run
    that fails here is reported with its error and left out of the trials."""
    for run in runs:
        try:
            CALLS[run.impl](ctx, run, ctx.batches[run.batch_size][0], 2)
        except Exception as exc:  # noqa: BLE001 - a broken strategy must not stop the bench
            run.error = f"{type(exc).__name__}: {exc}"
            log.warning("%s failed: %s", run.key, run.error)


def run_trials(ctx: Context, runs: list[Run]) -> bool:
    """Trial-major interleaving; returns False when interrupted (Ctrl-C)."""
    from tqdm import tqdm

    live = [r for r in runs if r.error is None]
    bar = tqdm(total=ctx.cfg.trials * len(live), desc="bench", unit="run", dynamic_ncols=True)
    try:
        for trial in range(ctx.cfg.trials):
            for run in live:
                if run.error is not None:
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"trial {trial + 1} {run.key}")
                try:
                    measure(ctx, run, first_trial=trial == 0)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001
                    run.error = f"{type(exc).__name__}: {exc}"
                    log.warning("%s failed: %s", run.key, run.error)
                bar.update(1)
    except KeyboardInterrupt:
        log.warning("interrupted: writing what was measured so far")
        return False
    finally:
        bar.close()
    return True


# ---------------------------------------------------------------------------- quality
def _find(runs: list[Run], strategy: str, impl: str, dtype: str, bs: int) -> Run | None:
    for r in runs:
        if (r.strategy, r.impl, r.dtype, r.batch_size, r.gamma) == (strategy, impl, dtype, bs, None):
            return r
    return None


def _same_rows(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b, strict=False))}/{len(b)}"


def check_identity(runs: list[Run]) -> None:
    """Token-identical rows (``"k/n"``): lossless strategies (ours and transformers')
    against our greedy, and each of our runs against its transformers twin (same
    dtype and batch size)."""
    for run in runs:
        entry = ENTRY_BY_NAME.get(run.strategy)
        if entry is None or run.sequences is None or run.gamma is not None:
            continue
        greedy = _find(runs, "greedy", "decodekit", run.dtype, run.batch_size)
        if entry.lossless and greedy is not None and greedy.sequences and greedy is not run:
            run.identical_to_greedy = _same_rows(run.sequences, greedy.sequences)
        twin = _find(runs, run.strategy, "transformers", run.dtype, run.batch_size)
        if run.impl == "decodekit" and twin is not None and twin.sequences:
            run.identical_to_transformers = _same_rows(run.sequences, twin.sequences)


def score_quality(ctx: Context, runs: list[Run]) -> None:
    """Continuation log-likelihood (per token, under the first dtype's model), distinct-2
    and, on the qa suite, exact-match accuracy, for the runs at the smallest batch size."""
    try:
        from decodekit.quality import continuation_loglik, distinct_n, exact_match
    except ImportError:  # pragma: no cover - quality lands with the EIS issue
        log.warning("decodekit.quality is not available: quality columns left empty")
        return
    scorer = ctx.models[ctx.cfg.dtypes[0]]
    bs = ctx.cfg.batch_sizes[0]
    prompts = [row for b in ctx.batches[bs] for row in zip(b.suites, b.records, b.prompt_ids, strict=True)]
    for run in runs:
        if run.impl == "floor" or run.sequences is None or run.batch_size != bs or run.gamma is not None:
            continue
        logliks, em = [], []
        for (suite, rec, prompt_ids), seq in zip(prompts, run.sequences, strict=False):
            if seq:
                logliks.append(continuation_loglik(scorer, prompt_ids, seq)[1])
            if suite == "qa" and "answer" in rec:
                em.append(exact_match(ctx.tokenizer.decode(seq, skip_special_tokens=True), rec["answer"]))
        run.quality = {
            "loglik_per_token": statistics.mean(logliks) if logliks else None,
            "distinct_2": distinct_n(run.sequences, 2),
            "exact_match": (sum(em) / len(em)) if em else None,
            "qa_prompts": len(em),
        }


# ---------------------------------------------------------------------------- the command
def load_models(cfg: BenchConfig):
    from decodekit.models import load_model

    models, tokenizer = {}, None
    for dtype in cfg.dtypes:
        models[dtype], tokenizer = load_model(cfg.model, dtype=dtype, device=cfg.device)
    return models, tokenizer


def run_bench(cfg: BenchConfig, models: dict, tokenizer, model_name: str) -> tuple[dict, bool]:
    """Card, plan, warm-up, trials, summaries; returns (results, completed)."""
    from decodekit.bench_report import format_card, summarize

    card = machine_card(models, cfg, model_name)
    print(format_card(card), flush=True)
    first = next(iter(models.values()))
    eos = first.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = first.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    batches = {bs: make_batches(tokenizer, cfg, bs, pad) for bs in cfg.batch_sizes}
    ctx = Context(cfg, models, tokenizer, batches, eos, pad)
    runs = plan_runs(cfg)
    started = time.perf_counter()
    _warm_up(ctx, runs)
    completed = run_trials(ctx, runs)
    check_identity(runs)
    if completed:
        score_quality(ctx, runs)
    results = {
        "card": card,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "completed": completed,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "prompts": dict(Counter(s for b in batches[cfg.batch_sizes[0]] for s in b.suites)),
        "runs": [run_record(r) for r in runs],
    }
    results["summary"] = summarize(results)
    return results, completed


def run_record(run: Run) -> dict:
    """A run as plain JSON-able data (options holding objects are written as text)."""
    d = asdict(run)
    d["key"] = run.key
    entry = ENTRY_BY_NAME.get(run.strategy)
    d["lossless"] = bool(entry and entry.lossless)
    d["options"] = {k: (v if isinstance(v, int | float | str | bool) or v is None else repr(v))
                    for k, v in run.options.items()}
    return d


def run(args: argparse.Namespace) -> int:
    """The ``decodekit bench`` subcommand."""
    cfg = resolve_config(args)
    from decodekit.bench_report import write_outputs
    from decodekit.models import DEFAULT_MODEL

    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        models, tokenizer = load_models(cfg)
        results, completed = run_bench(cfg, models, tokenizer, cfg.model or DEFAULT_MODEL)
    finally:
        torch.set_num_threads(threads)
    results["command"] = "decodekit bench " + " ".join(_argv_echo(args))
    paths = write_outputs(results, cfg.output_dir)
    print("\n".join(f"wrote {p}" for p in paths), flush=True)
    return 0 if completed else 130


def _argv_echo(args: argparse.Namespace) -> list[str]:
    skip = {"func", "command", "verbose"}
    out = []
    for k, v in vars(args).items():
        if k in skip or v is None or v is False or (k == "preset" and v == "default"):
            continue
        out.append(f"--{k}" if v is True else f"--{k} {v}")
    return out
