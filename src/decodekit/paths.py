"""Where decodekit keeps what it makes: the model cache (converted models, requantized GGUF
files, measured cost curves). Imports nothing of decodekit, so every layer may use it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$DECODEKIT_CACHE``, else ``~/.cache/decodekit``."""
    return Path(os.environ.get("DECODEKIT_CACHE", Path.home() / ".cache" / "decodekit"))
