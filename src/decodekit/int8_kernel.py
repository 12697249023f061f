"""decodekit's int8 weight-only Linear kernel (``int8_kernel.cpp``): what ``QuantLinear`` runs
for ``dtype="int8"`` on x86-64 CPUs with AVX2 and FMA (both our CPU kinds), compiled on first
use (about 30-60 s, once per machine and PyTorch version, into ``cache_dir()/kernels``).

Why our own: decoding and speculative verification multiply a few rows (1-8 new tokens per
row) by every weight. PyTorch's ``_weight_int8pack_mm`` re-reads the weights every 4 rows and
is compute-bound already at one row on AVX2; this kernel widens each int8 weight row once per
8 rows of input. It is batch-invariant by construction (a row's output never depends on the
rows beside it) and runs the same AVX2 instructions on both CPU kinds. It also takes any K
(PyTorch's kernel crashed on K = 17 here).

``DECODEKIT_INT8_KERNEL``: ``auto`` (default: ours where it builds, else PyTorch's, with the
reason logged once) or ``torch`` (PyTorch's kernel, for comparisons). Building needs a C++
compiler and ``ninja`` (a dependency of decodekit).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from decodekit.paths import cache_dir
from decodekit.validation import check_choice

__all__ = ["INT8_KERNELS", "int8_kernel", "int8_kernel_problem", "int8_linear"]

log = logging.getLogger(__name__)
INT8_KERNELS = ("auto", "torch")  # the values DECODEKIT_INT8_KERNEL takes
SOURCE = Path(__file__).with_name("int8_kernel.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # AVX2 code runs on the AVX512 kind as well


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _ninja_on_path() -> bool:
    """``ninja`` findable by PyTorch's builder; the ``ninja`` wheel installs it beside Python."""
    if shutil.which("ninja"):
        return True
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
        return True
    return False


def _prerequisites() -> str | None:
    """What this machine lacks to build the kernel, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64 (this CPU: {platform.machine()})"
    if not {"avx2", "fma"} <= _cpu_flags():
        return "this CPU lacks AVX2 or FMA"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler on PATH"
    if not _ninja_on_path():
        return "ninja is not installed (pip install ninja)"
    return None


@functools.cache
def int8_kernel_problem() -> str | None:
    """Build (once per machine) and load decodekit's kernel: None when it runs here, else why not."""
    problem = _prerequisites()
    if problem is None:
        from torch.utils import cpp_extension

        build = cache_dir() / "kernels" / f"int8-torch{torch.__version__.split('+')[0]}"
        build.mkdir(parents=True, exist_ok=True)
        log.info("decodekit: building the int8 kernel in %s (once, about a minute)", build)
        try:
            cpp_extension.load(name="decodekit_int8", sources=[str(SOURCE)], extra_cflags=FLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(build),
                               is_python_module=False, verbose=False)
        except (RuntimeError, OSError, ImportError) as exc:
            problem = f"its build failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
    if problem is not None:
        log.warning("decodekit: int8 runs on PyTorch's _weight_int8pack_mm, not decodekit's kernel: %s", problem)
    return problem


def int8_kernel() -> str:
    """The kernel ``QuantLinear`` uses for int8 weights here: ``"decodekit"`` or ``"torch"``."""
    choice = check_choice("DECODEKIT_INT8_KERNEL", os.environ.get("DECODEKIT_INT8_KERNEL", "auto"), INT8_KERNELS)
    return "decodekit" if choice == "auto" and int8_kernel_problem() is None else "torch"


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16 | float32, q [N, K] int8, scale [N] in x's dtype -> [M, N] in x's
    dtype: ``(x @ q.T) * scale``, on decodekit's kernel (``int8_kernel()`` must be it)."""
    return torch.ops.decodekit.int8_linear(x, q, scale)
