"""The runs: prompts cut into batches, one timed call per batch, the plan and the trials.

A run is (strategy, implementation, dtype, batch size): ``decodekit.generate``, its
transformers ``model.generate`` peer, or the floor - a bare forward loop (prefill, then
argmax + one token per forward, nothing else). Each trial times a run over every batch of
its batch size; trials are interleaved (trial-major) so that a noisy neighbour slows every
run alike. Ctrl-C stops the trials; what was measured is kept.
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from decodekit.bench.card import sync
from decodekit.bench.config import (
    DRAFTER,
    ENTRY_BY_NAME,
    LLAMA_CPP,
    PEER_STRATEGIES,
    BenchConfig,
    is_llama_cpp,
    load_suite,
    peer_dtype,
)

__all__ = ["Batch", "Run", "Context", "make_batches", "floor_generate", "PeakMemory", "ForwardCounter",
           "measure", "plan_runs", "warm_up", "run_trials", "run_record"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- batches
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


# ---------------------------------------------------------------------------- meters
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
        self.model, self.calls = model, 0  # model None (a peer's own engine): nothing counted

    def _hook(self, module, args):
        if module is self.model:
            self.calls += 1

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._hook) if self.model is not None else None
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()


# ---------------------------------------------------------------------------- runs
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


def run_record(run: Run) -> dict:
    """A run as plain JSON-able data (options holding objects are written as text)."""
    d = asdict(run)
    d["key"] = run.key
    entry = ENTRY_BY_NAME.get(run.strategy)
    d["lossless"] = bool(entry and entry.lossless)
    d["options"] = {k: (v if isinstance(v, int | float | str | bool) or v is None else repr(v))
                    for k, v in run.options.items()}
    return d


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
    peers: dict = field(default_factory=dict)  # strategy -> llama_cpp.Llama (peer rows), made once


# ---------------------------------------------------------------------------- the three callers
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


def _drafter_model(model, drafter: str):
    """The drafter as a model object, for transformers' ``assistant_model``."""
    if drafter.startswith("layers:"):
        from decodekit.strategies.drafters import early_exit_model

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


def _llama(ctx: Context, strategy: str):
    """llama-cpp-python's high-level ``Llama`` on the bench's GGUF (made once per strategy):
    greedy, or prompt lookup (``LlamaPromptLookupDecoding`` as its draft model)."""
    if strategy not in ctx.peers:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        options = PEER_STRATEGIES[strategy]
        draft = LlamaPromptLookupDecoding(**options) if options is not None else None
        ctx.peers[strategy] = Llama(str(peer_gguf(ctx)), n_ctx=4096, n_threads=torch.get_num_threads(),
                                    n_threads_batch=torch.get_num_threads(), draft_model=draft, verbose=False)
    return ctx.peers[strategy]


def peer_gguf(ctx: Context) -> Path:
    """The GGUF llama.cpp's own rows run: the one decodekit's llama.cpp backend runs in the
    same cells (requantized for ``llama.cpp:q4_0``...), else the bench model's."""
    from decodekit.models import gguf_path

    ours = ctx.models.get(peer_dtype(ctx.cfg.dtypes))
    return Path(ours.path) if ours is not None else gguf_path(ctx.cfg.model)


def call_llama_cpp(ctx: Context, run: Run, batch: Batch, max_new_tokens: int):
    """llama.cpp's own decoding (temperature 0), one row after another (its ``generate`` runs
    one sequence); the cache is reset per row, so no prompt prefix is reused across rows."""
    llm = _llama(ctx, run.strategy)
    eos = set() if ctx.cfg.ignore_eos else set(ctx.eos)
    rows = []
    for prompt in batch.prompt_ids:
        llm.reset()
        row = []
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            row.append(int(token))
            if len(row) == max_new_tokens or token in eos:
                break
        rows.append(row)
    return rows, None


CALLS = {"decodekit": call_decodekit, "transformers": call_transformers, "floor": call_floor,
         LLAMA_CPP: call_llama_cpp}


# ---------------------------------------------------------------------------- timing
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


def _add_decode(trial: dict, stats) -> None:
    """The batch's decode part (after its first tokens, so without the prefill): tokens and
    seconds, from our rows' ``RequestStats`` (peers report none)."""
    if not stats or not any(s.new_tokens for s in stats):
        return
    first = max(s.first_token_seconds for s in stats if s.new_tokens)
    trial["decode_seconds"] = trial.get("decode_seconds", 0.0) + max(s.seconds for s in stats) - first
    trial["decode_tokens"] = trial.get("decode_tokens", 0) + sum(max(s.new_tokens - 1, 0) for s in stats)


def measure(ctx: Context, run: Run, first_trial: bool) -> None:
    """Time one run over every batch of its batch size; append one trial."""
    call = CALLS[run.impl]
    model = ctx.models.get(run.dtype) if run.impl != LLAMA_CPP else None
    clock = time.process_time if ctx.cfg.clock == "cpu" else time.perf_counter
    trial = {"seconds": 0.0, "tokens": 0, "suites": {}}
    sequences = []
    with PeakMemory(ctx.cfg.device) as mem:
        for batch in ctx.batches[run.batch_size]:
            with ForwardCounter(model) as counter:
                sync(ctx.cfg.device)
                t0 = clock()
                rows, stats = call(ctx, run, batch, ctx.cfg.max_new_tokens)
                sync(ctx.cfg.device)
                seconds = clock() - t0
            tokens = sum(len(r) for r in rows)
            trial["seconds"] += seconds
            trial["tokens"] += tokens
            _add_decode(trial, stats)
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
        torch_model = not is_llama_cpp(dtype)  # floor and transformers need a torch module
        for bs in cfg.batch_sizes:
            if torch_model:
                runs.append(Run("floor", "floor", dtype, bs, {}))
            for name in cfg.strategies:
                entry = ENTRY_BY_NAME[name]
                runs.append(Run(name, "decodekit", dtype, bs, dict(entry.options)))
                if torch_model and cfg.transformers and entry.hf is not None and (bs == 1 or not entry.hf_batch1_only):
                    runs.append(Run(name, "transformers", dtype, bs, dict(entry.hf)))
    runs += _peer_runs(cfg)
    sweep_bs, sweep_dtype = cfg.batch_sizes[0], cfg.dtypes[0]
    for name in cfg.strategies:
        entry = ENTRY_BY_NAME[name]
        default_gamma = entry.options.get("gamma")
        for gamma in cfg.gammas if entry.drafts else []:
            if gamma != default_gamma:
                runs.append(Run(name, "decodekit", sweep_dtype, sweep_bs,
                                {**entry.options, "gamma": gamma}, gamma=gamma))
    return runs


def _peer_runs(cfg: BenchConfig) -> list[Run]:
    """llama.cpp's own greedy / prompt lookup (``--peers llama.cpp``), in the first llama.cpp
    dtype's cells (``peer_dtype``), beside decodekit on the llama.cpp backend, on its GGUF."""
    if LLAMA_CPP not in cfg.peers:
        return []
    return [Run(name, LLAMA_CPP, peer_dtype(cfg.dtypes), bs, dict(PEER_STRATEGIES[name] or {}))
            for bs in cfg.batch_sizes for name in PEER_STRATEGIES if name in cfg.strategies]


def warm_up(ctx: Context, runs: list[Run]) -> None:
    """One short call per run (lazy imports, allocator); a run that fails here is reported
    with its error and left out of the trials. Then the draft policies' cost curves."""
    for run in runs:
        try:
            CALLS[run.impl](ctx, run, ctx.batches[run.batch_size][0], 2)
        except Exception as exc:  # noqa: BLE001 - a broken strategy must not stop the bench
            run.error = f"{type(exc).__name__}: {exc}"
            log.warning("%s failed: %s", run.key, run.error)
    warm_cost_curves(ctx, runs)


def warm_cost_curves(ctx: Context, runs: list[Run]) -> None:
    """Measure, before any trial, the forward-cost curves the draft policies read: every
    batch-size bucket a drafting run reaches (its rows leave as they finish: 4, 2, 1) up to
    its widest verify forward. Measured on first use (once per process, as a user's first
    call does), they would land inside one timed trial of whichever run needed them first
    (the short warm-up call above reaches neither its full width nor the smaller buckets)."""
    from decodekit.strategies.draft_policy import batch_bucket, forward_cost_curve

    for run in runs:
        if run.impl != "decodekit" or run.error is not None or not ENTRY_BY_NAME[run.strategy].drafts:
            continue
        top = min(int(run.options.get("gamma_max") or run.options.get("gamma", 5)), ctx.cfg.max_new_tokens)
        for bucket in range(batch_bucket(run.batch_size).bit_length()):
            forward_cost_curve(ctx.models[run.dtype], top + 1, batch=1 << bucket)


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
