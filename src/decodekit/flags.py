"""Command-line flag helpers shared by every front door's parser (``cli``, ``demo``, ``ray``,
``constraints``). Imports nothing of decodekit, so a lower layer can add its own flags without
importing the CLI."""

from __future__ import annotations

__all__ = ["add_flag"]


def add_flag(parser, name: str, **kwargs):
    """Add ``--name`` and its dashed spelling ``--na-me`` for the same option."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    kwargs.setdefault("dest", name)
    return parser.add_argument(*spellings, **kwargs)
