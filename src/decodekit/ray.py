"""Batch generation on Ray Data: ``decodekit generate --engine ray`` and ``generate_dataset``.

The driver reads the prompts, owns the ``--output_file`` (``io.ResultWriter``: resume,
overwrite, nothing written twice) and shows the progress; a pool of Ray actors
(``map_batches``) decodes. Each actor loads the model once and turns each of its batches into
the records of the single-process loop (``batch_runner.decode_batch``): same fields, same
``index``, same stats. Workers never touch the output file.

Order: the driver writes each batch as it arrives, so the file is in completion order; every
record carries its prompt's ``index``, which says where it belongs (sort by it to restore the
prompts file's order).

Failures: an actor whose process dies is restarted and its batch retried by Ray
(``RETRIES`` times); a batch is written only once it is complete, and a record already in the
file is never written again, so each prompt ends up in the file exactly once. A Python error
in a batch is not retried: it stops the job, and ``--resume`` continues it.

Ray is an optional extra (``pip install 'decodekit[ray]'``), imported only when used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

from decodekit.validation import DecodeKitError, check_choice, check_float, check_int

__all__ = ["RayEngine", "DecodeWorker", "generate_dataset", "prompt_dataset", "add_engine_flags",
           "engine_from_args", "run_ray", "import_ray", "INSTALL_COMMAND"]

log = logging.getLogger("decodekit")

INSTALL_COMMAND = "pip install 'decodekit[ray]'"
RETRIES = 3  # restarts of a dead actor, and retries of the batch it was decoding
ENGINE_FLAGS = ("ray_address", "num_workers", "worker_cpus", "worker_gpus", "worker_threads")


def import_ray():
    """The ``ray`` package with Ray Data, or a one-line error with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DecodeKitError(f"--engine ray needs Ray, which is not installed: {INSTALL_COMMAND}") from None
    return ray


@dataclass(frozen=True)
class RayEngine:
    """Where and how wide a Ray job runs, checked when built.

    ``address``: None starts a local Ray instance (or uses the one this process is already
    connected to); ``"auto"`` or ``"ray://host:10001"`` joins an existing cluster.
    ``num_workers`` actors, each reserving ``worker_cpus`` CPUs and ``worker_gpus`` GPUs and
    running torch on ``worker_threads`` threads (default: its CPUs, at least 1).
    """

    address: str | None = None
    num_workers: int = 1
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    worker_threads: int | None = None

    def __post_init__(self):
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise DecodeKitError(f"ray_address must be a non-empty address (auto, ray://host:10001), got {self.address!r}")
        check_int("num_workers", self.num_workers, min_value=1)
        check_float("worker_cpus", self.worker_cpus, min_value=0.0, min_inclusive=False)
        check_float("worker_gpus", self.worker_gpus, min_value=0.0)
        if self.worker_threads is not None:
            check_int("worker_threads", self.worker_threads, min_value=1)

    @property
    def threads(self) -> int:
        return self.worker_threads or max(1, int(self.worker_cpus))


class DecodeWorker:
    """One Ray actor: loads the model once, then decodes batch after batch.

    ``load``: ``load_model`` arguments (spec, dtype, device, trust_remote_code);
    ``encoding``: (use_chat_template or None for the tokenizer's default, allow_special_tokens).
    """

    def __init__(self, load: dict, generate_kwargs: dict, encoding: tuple, threads: int):
        import torch

        from decodekit.batch_runner import chat_template_on
        from decodekit.models import load_model

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(load["spec"], dtype=load["dtype"], device=load["device"],
                                                trust_remote_code=load["trust_remote_code"])
        self.encoding = (chat_template_on(self.tokenizer, encoding[0]), encoding[1])
        self.generate_kwargs = generate_kwargs
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        """``batch``: columns ``prompt`` (and ``index``) -> one row per record: ``index``,
        ``record`` (its JSON line), ``worker``, ``busy_s`` (the batch's time, on its first row)."""
        from decodekit.batch_runner import decode_batch

        texts = [str(text) for text in batch["prompt"]]
        indices = [int(i) for i in batch["index"]] if "index" in batch else [None] * len(texts)
        start = time.perf_counter()
        records, _ = decode_batch(self.model, self.tokenizer, indices, texts, self.generate_kwargs,
                                  self.encoding)
        busy = time.perf_counter() - start
        return {
            "index": [record.get("index", -1) for record in records],
            "record": [json.dumps(record, ensure_ascii=False) for record in records],
            "worker": [self.name] * len(records),
            "busy_s": [busy] + [0.0] * (len(records) - 1),
        }


def _check_generate_options(strategy: str, options: dict) -> None:
    """Checked by ``GenerateParams.from_kwargs`` (what ``generate`` checks without a model) on
    the driver, before any actor starts."""
    from decodekit.params import GenerateParams

    GenerateParams.from_kwargs(strategy=strategy, **options)


def generate_dataset(dataset, model: str | None = None, strategy: str = "greedy", *, batch_size: int = 1,
                     dtype: str | None = None, device: str | None = None, engine: RayEngine | None = None,
                     encoding: tuple = (None, False), trust_remote_code: bool = False, **options):
    """Decode a Ray Dataset of prompts on an actor pool; returns the (lazy) Dataset of results.

    ``dataset``: a ``prompt`` column and, for records that say where they belong, an int
    ``index`` column. ``model``: a model spec as for ``load_model`` (each actor loads it
    once). ``options``: ``decodekit.generate`` arguments (``max_new_tokens``, ``seed``, strategy
    options...), checked here before any actor starts. ``encoding``: (use_chat_template, None
    = the tokenizer's default; allow_special_tokens). Each result row holds ``index``,
    ``record`` (the JSON line ``decodekit generate`` writes for it), ``worker`` and ``busy_s``.
    Uses the current Ray connection (Ray Data starts a local instance if there is none).
    """
    from decodekit.models import check_model_spec

    ray = import_ray()
    engine = engine or RayEngine()
    check_int("batch_size", batch_size, min_value=1)
    check_model_spec(model)
    _check_generate_options(strategy, options)
    load = dict(spec=model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    kwargs = dict(generate_kwargs=dict(strategy=strategy, **options), load=load,
                  encoding=tuple(encoding), threads=engine.threads)
    gpus = {"num_gpus": engine.worker_gpus} if engine.worker_gpus else {}
    with warnings.catch_warnings():  # Ray >= 2.60 deprecates these actor options (and has no other way in)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(DecodeWorker, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                                   compute=ray.data.ActorPoolStrategy(size=engine.num_workers),
                                   num_cpus=engine.worker_cpus, batch_format="numpy", max_restarts=RETRIES,
                                   max_task_retries=RETRIES, **gpus)


def prompt_dataset(prompts: list[str], todo: list[int], batch_size: int):
    """The prompts still to run as a Ray Dataset, one block per batch of the single-process
    loop, so each actor batch holds the same prompts as there (same records, even sampled
    with a ``seed``)."""
    import pandas as pd

    from decodekit.io import iter_batches

    ray = import_ray()
    frames = [pd.DataFrame({"index": batch, "prompt": [prompts[i] for i in batch]})
              for batch in iter_batches(todo, batch_size)]
    return ray.data.from_pandas(frames)


# ---------------------------------------------------------------- command line


def add_engine_flags(parser) -> None:
    """``--engine`` and the Ray flags of ``decodekit generate``."""
    from decodekit.flags import add_flag

    group = parser.add_argument_group("engine")
    add_flag(group, "engine", default="local",
             help="local (this process) | ray (Ray Data actors on a local Ray instance or a cluster; "
                  f"needs {INSTALL_COMMAND}) (default local)")
    add_flag(group, "ray_address", default=None,
             help="existing Ray cluster: auto (after `ray start --head`) or ray://host:10001 "
                  "(default: start a local Ray instance)")
    add_flag(group, "num_workers", type=int, default=None, help="Ray actors, each with its own model (default 1)")
    add_flag(group, "worker_cpus", type=float, default=None, help="CPUs reserved per actor (default 1)")
    add_flag(group, "worker_gpus", type=float, default=None, help="GPUs reserved per actor (default 0)")
    add_flag(group, "worker_threads", type=int, default=None,
             help="torch threads per actor (default: its CPUs, at least 1)")


def engine_from_args(args) -> RayEngine | None:
    """The Ray engine of ``--engine ray`` (None for the local loop), every flag checked and
    Ray's presence too, before anything starts or loads."""
    engine = getattr(args, "engine", "local")
    check_choice("engine", engine, ("local", "ray"))
    given = [name for name in ENGINE_FLAGS if getattr(args, name, None) is not None]
    if engine == "local":
        if given:
            raise DecodeKitError(f"--{given[0]} needs --engine ray")
        return None
    if args.debug or getattr(args, "show_drafts", None):
        raise DecodeKitError("--debug / --show_drafts print traces in one process: not with --engine ray")
    settings = {name: getattr(args, name) for name in given}
    settings["address"] = settings.pop("ray_address", None)
    ray_engine = RayEngine(**settings)
    import_ray()
    return ray_engine


def _connect(ray, engine: RayEngine, model_spec) -> bool:
    """Connect to Ray: the connection this process already has, the cluster at
    ``engine.address``, or a new local instance. True when we started it (and stop it)."""
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, configure_logging=True, include_dashboard=False)
    if engine.address:
        ray.init(address=engine.address, **quiet)
        return True
    from decodekit.models import local_model_dir

    local_model_dir(model_spec, "model_path")  # convert a GGUF model once here, not in every actor at once
    cpus = max(os.cpu_count() or 1, math.ceil(engine.num_workers * engine.worker_cpus))
    gpus = math.ceil(engine.num_workers * engine.worker_gpus)
    ray.init(num_cpus=cpus, **({"num_gpus": gpus} if gpus else {}), **quiet)
    return True


class _Tally:
    """Progress bar over prompts, and the summary: prompts, tokens, tokens/s overall and per
    worker, acceptance of drafting strategies."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="prompts", unit="prompt", file=sys.stderr, disable=total <= 1)
        self.tokens = self.prompts = self.drafted = self.accepted = 0
        self.first_s: float | None = None  # when the first batch arrived (actors started, model loaded)
        self.by_worker = defaultdict(lambda: [0, 0, 0.0])  # worker -> [prompts, tokens, busy seconds]

    def add(self, records: list[dict], workers, busy, elapsed: float) -> None:
        if self.first_s is None:
            self.first_s = elapsed
        prompts = len({r.get("index") for r in records})
        self.bar.update(prompts)
        self.prompts += prompts
        for record, worker, seconds in zip(records, workers, busy):
            stats = record["stats"]
            row = self.by_worker[str(worker)]
            row[0] += record.get("sample_index", 0) == 0
            row[1] += stats["new_tokens"]
            row[2] += float(seconds)
            self.tokens += stats["new_tokens"]
            self.drafted += stats.get("drafted", 0)
            self.accepted += stats.get("accepted", 0)

    def summary(self, seconds: float, start_s: float) -> str:
        self.bar.close()
        lines = [f"ray: {self.prompts} prompts, {self.tokens} tokens in {seconds:.1f} s "
                 f"({self.tokens / seconds if seconds else 0:.1f} tokens/s overall; Ray start {start_s:.1f} s, "
                 f"first batch done at {self.first_s or 0:.1f} s); {len(self.by_worker)} worker(s)"]
        for worker, (prompts, tokens, busy) in sorted(self.by_worker.items()):
            rate = tokens / busy if busy else 0.0
            lines.append(f"  worker {worker}: {prompts} prompts, {tokens} tokens, {rate:.1f} tokens/s while decoding")
        if self.drafted:
            lines.append(f"  acceptance: {self.accepted / self.drafted:.4f} ({self.accepted}/{self.drafted} drafted tokens)")
        return "\n".join(lines)


def _job_kwargs(args, generate_kwargs: dict) -> dict:
    """``generate_dataset`` arguments from the ``generate`` flags."""
    options = {k: v for k, v in generate_kwargs.items() if k not in ("strategy", "debug")}
    return dict(model=args.model_path, strategy=generate_kwargs["strategy"], batch_size=args.batch_size,
                dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                encoding=(args.use_chat_template, args.allow_special_tokens), **options)


def run_ray(args, prompts: list[str], generate_kwargs: dict, writer, engine: RayEngine) -> list[dict]:
    """``decodekit generate --engine ray``: the pending prompts through ``generate_dataset``,
    each batch written by this process as it arrives. Returns the records of this run."""
    todo = writer.pending() if writer is not None else list(range(len(prompts)))
    if len(todo) < len(prompts):
        log.warning("resume: %d of %d prompts already in %s", len(prompts) - len(todo), len(prompts), args.output_file)
    ray = import_ray()
    start = time.perf_counter()
    started = _connect(ray, engine, args.model_path)
    start_s = time.perf_counter() - start
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts prompts
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        results = generate_dataset(prompt_dataset(prompts, todo, args.batch_size), engine=engine,
                                   **_job_kwargs(args, generate_kwargs))
        tally, records = _Tally(len(todo)), []
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            done = [json.loads(line) for line in batch["record"]]
            if writer is not None:
                writer.write(done)
            records.extend(done)
            tally.add(done, batch["worker"], batch["busy_s"], time.perf_counter() - start)
    finally:
        if started:
            ray.shutdown()
    print(tally.summary(time.perf_counter() - start, start_s), file=sys.stderr)
    return sorted(records, key=lambda r: (r["index"], r.get("sample_index", 0)))
