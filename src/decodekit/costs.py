"""What a target forward costs on this machine: ``t(n, B)``, seconds of one cached forward of
``B`` rows with ``n`` new tokens each, measured once and kept on disk.

The draft policies (``strategies/draft_policy.py``) read it to decide how many drafts pay; the
benchmark and the server measure it before their first timed step.

A curve depends on the machine, the model and how it runs, so the calibration file's key is
all of them (``calibration_key``): the CPU model and the kernels PyTorch picked
(``ATEN_CPU_CAPABILITY``), the torch version and thread count, the model's architecture,
sizes, dtype, quantization, backend and device, and the batch size. A new process with the
same key reads the curve instead of measuring it again (seconds at start, and the same
draft widths run to run, so the same output). The files live in the model cache's
``cost_curves/`` folder; ``DECODEKIT_COST_CACHE`` names another folder, or ``0`` for none.
A model without a name (built in memory) is measured per process only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

from decodekit.kvstate import backend_of

__all__ = ["CostCurve", "VerifyCost", "forward_cost_curve", "batch_bucket", "calibration_key",
           "calibration_file", "cpu_model", "GRID", "CURVES", "model_key", "monotone", "measure_forwards",
           "time_steps"]

GRID = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)
CONTEXT = 64  # tokens of context before the timed forwards
MEASURE = "stream"  # how t(n) is timed (``time_steps``): a curve timed otherwise is measured again
CURVES: dict[tuple, CostCurve] = {}  # (model key, batch size) -> curve, in memory


class CostCurve:
    """Measured seconds of one forward with ``n`` new tokens per row (one batch size); linear
    in between points (``n`` may be fractional)."""

    def __init__(self):
        self.points: dict[int, float] = {}

    def __call__(self, n: int) -> float:
        if n in self.points:
            return self.points[n]
        xs = sorted(self.points)
        if n <= xs[0]:
            return self.points[xs[0]]
        if n >= xs[-1]:  # beyond the measured range: extend the last slope
            x0, x1 = (xs[-2], xs[-1]) if len(xs) > 1 else (xs[-1], xs[-1])
            slope = (self.points[x1] - self.points[x0]) / (x1 - x0) if x1 > x0 else 0.0
            return self.points[x1] + slope * (n - x1)
        hi = next(x for x in xs if x > n)
        lo = max(x for x in xs if x < n)
        w = (n - lo) / (hi - lo)
        return (1 - w) * self.points[lo] + w * self.points[hi]

    def as_dict(self) -> dict[int, float]:
        return dict(sorted(self.points.items()))


# ---------------------------------------------------------------------------- keys and files
def model_key(model) -> tuple:
    """What a cost curve depends on: architecture, size, dtype (an int8/int4 model is not its
    float twin), backend and device; a model without a name is told apart by its identity."""
    from decodekit.quant import quant_kernel, quant_scheme

    backend = backend_of(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    param = next(model.parameters()) if backend.in_torch else None
    dtype, device = (str(param.dtype), str(param.device)) if param is not None else (None, str(model.device))
    name = getattr(cfg, "_name_or_path", "")
    return (type(model).__name__, name, getattr(cfg, "num_hidden_layers", None),
            getattr(cfg, "hidden_size", None), getattr(cfg, "vocab_size", None), dtype, quant_scheme(model),
            quant_kernel(model), backend.name, device, 0 if name else id(model))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def calibration_key(model, batch: int) -> dict | None:
    """Everything a curve of ``model`` at ``batch`` rows depends on; None when the model has
    no name (in memory only: its curve is not worth a file)."""
    key = model_key(model)
    if key[-1]:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return {"cpu": cpu_model(), "capability": capability, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "model": [str(k) for k in key], "batch": batch,
            "context": CONTEXT, "measure": MEASURE}


def calibration_file(key: dict) -> Path | None:
    """The file a curve with ``key`` lives in, or None when ``DECODEKIT_COST_CACHE=0``."""
    folder = os.environ.get("DECODEKIT_COST_CACHE", "")
    if folder == "0":
        return None
    if not folder:
        from decodekit.paths import cache_dir

        folder = cache_dir() / "cost_curves"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(folder).expanduser() / f"{digest}.json"


def _read(path: Path | None, key: dict) -> dict[int, float]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError):  # no file (or no cache): measure
        return {}
    if saved.get("key") != key:
        return {}
    return {int(n): float(t) for n, t in saved.get("points", {}).items()}


def _write(path: Path | None, key: dict, curve: CostCurve) -> None:
    """Write by rename, so a reader never sees half a file (two processes may measure)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "points": curve.as_dict()}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only cache costs a measurement next time, nothing else
        pass


# ---------------------------------------------------------------------------- measuring
@torch.inference_mode()
def measure_forwards(model, todo: list[int], batch: int, repeats: int) -> dict[int, float]:
    """What a step of ``batch`` rows x ``n`` new tokens costs a decode of one-token steps (after
    ``CONTEXT`` tokens), for each ``n`` in ``todo``: ``time_steps`` on a fresh state."""
    from decodekit.cache import ModelState
    from decodekit.model_info import vocab_size

    gen = torch.Generator().manual_seed(0)
    vocab = vocab_size(model)
    ctx = torch.randint(4, vocab, (batch, CONTEXT), generator=gen)  # [B, CONTEXT]
    state, _ = ModelState.prefill(model, ctx)
    inputs = {n: torch.randint(4, vocab, (batch, n), generator=gen) for n in sorted(set(todo) | {1})}
    return {n: t for n, t in time_steps(state, inputs, repeats).items() if n in todo}


def time_steps(state, inputs: dict[int, Tensor], repeats: int) -> dict[int, float]:
    """``t(n)``: the seconds a forward of ``inputs[n] [B, n]`` adds to a stream of one-token
    forwards, fastest of ``repeats`` rounds (sizes timed in turn; ``inputs`` holds ``n = 1``).

    Each size is timed as the pair (``n`` tokens, then one token), after a one-token forward
    (the previous pair's last; an untimed one, also the warm-up, before the first), and
    ``t(n) = pair(n) - pair(1) / 2``: ``t(1)`` is a one-token step after another, and a backend
    that prepares each new width (llama.cpp builds its compute graph again when the batch
    shape changes: +0.6 ms of a 8.3 ms one-token forward on the AMD EPYC) charges the way in
    and back out to the wider step, as a speculative decode pays them."""
    one = inputs[1]
    pairs: dict[int, float] = {n: math.inf for n in inputs}
    state.extend(one)  # the step before the first pair: one token (each pair ends with one)
    state.crop(1)
    for _ in range(repeats):
        for n, tokens in inputs.items():
            _sync(state)
            t0 = time.perf_counter()
            state.extend(tokens)
            state.crop(n)
            state.extend(one)
            _sync(state)
            pairs[n] = min(pairs[n], time.perf_counter() - t0)
            state.crop(1)
    return {n: pair - pairs[1] / 2 for n, pair in pairs.items()}


def _sync(state) -> None:
    if state.ids.device.type == "cuda":
        torch.cuda.synchronize()


def forward_cost_curve(model, max_tokens: int, *, batch: int = 1, repeats: int = 3) -> CostCurve:
    """Seconds of one cached forward of ``batch`` rows with ``n`` new tokens each (after
    ``CONTEXT`` tokens) for ``n`` on a grid up to ``max_tokens``.

    Kept in memory per model and batch size, and on disk per ``calibration_key``; asking for a
    larger ``max_tokens`` later measures only the missing points. The machine may be shared
    and noise only ever adds time, so the sizes are timed in turn (``repeats`` rounds) and
    each keeps its fastest run; a point is then never above a larger size's (``monotone``).
    """
    curve = CURVES.get((model_key(model), batch))
    key = calibration_key(model, batch)
    path = calibration_file(key) if key is not None else None
    if curve is None:
        curve = CURVES[(model_key(model), batch)] = CostCurve()
        curve.points.update(_read(path, key))
    todo = [n for n in GRID if n < max_tokens and n not in curve.points]
    if max_tokens not in curve.points:
        todo.append(max_tokens)
    if not todo:
        return curve
    curve.points.update(measure_forwards(model, todo, batch, repeats))
    monotone(curve)
    _write(path, key, curve)
    return curve


def monotone(curve: CostCurve) -> None:
    """A forward over more tokens never costs less: each point becomes the smallest time
    measured at its size or above (noise on a shared machine only adds)."""
    low = math.inf
    for n in sorted(curve.points, reverse=True):
        low = curve.points[n] = min(curve.points[n], low)


def batch_bucket(batch: int) -> int:
    """The batch size whose curve serves ``batch`` rows: the next power of two (1, 2, 4, ...)."""
    return 1 << max(batch - 1, 0).bit_length()


class VerifyCost:
    """``t(n, B)``: seconds of one forward of ``B`` rows with ``n`` new tokens each.

    Measured lazily for the batch sizes actually decoding (``forward_cost_curve``, cached per
    model and batch size), in buckets of powers of two: ``B`` rows of the bucket ``B' >= B``
    cost what ``B'`` rows of ``n * B / B'`` tokens cost (the matmuls see ``n * B`` tokens).
    """

    def __init__(self, model, max_tokens: int):
        self.model, self.max_tokens = model, max_tokens
        self.curves: dict[int, CostCurve] = {}  # bucket -> curve

    def __call__(self, n: int, batch: int) -> float:
        bucket = batch_bucket(batch)
        curve = self.curves.get(bucket)
        if curve is None:
            curve = self.curves[bucket] = forward_cost_curve(self.model, self.max_tokens, batch=bucket)
        return curve(n * batch / bucket)
