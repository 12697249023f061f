"""Where a benchmark script's finished run goes: ``DIR/report.md`` (title, date, CPU model,
threads, versions, the exact command, then the script's own lines) and ``DIR/results.json``
(the same facts and the script's data), in a NEW directory only, so a finished result is never
overwritten. ``docs/`` cites these reports; ``benchmarks/docs_tables.py`` renders the tables of
``decodekit bench`` runs.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

import decodekit
from decodekit.costs import cpu_model

__all__ = ["check_output_dir", "write_report"]


def check_output_dir(parser, output_dir: str | None) -> Path | None:
    """``output_dir`` as a Path, or a usage error (exit 2) when it already holds files."""
    if output_dir is None:
        return None
    path = Path(output_dir)
    if path.exists() and any(path.iterdir()):
        parser.error(f"--output_dir {path} is not empty: a finished report is never overwritten")
    return path


def machine() -> dict:
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "decodekit": decodekit.__version__, "command": " ".join(["python", *sys.argv])}


def write_report(out_dir: Path, title: str, lines: list[str], data: dict) -> None:
    """Write ``report.md`` (provenance, then ``lines``) and ``results.json`` into ``out_dir``."""
    card = machine()
    out_dir.mkdir(parents=True, exist_ok=True)
    head = [f"# {title}", "", f"- date: {card['date']}",
            f"- CPU: {card['cpu']} ({card['cpu_capability']} kernels), {card['torch_threads']} torch threads",
            f"- software: torch {card['torch']}, decodekit {card['decodekit']}",
            f"- command: `{card['command']}`", ""]
    (out_dir / "report.md").write_text("\n".join(head + lines) + "\n", encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps({"card": card, **data}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_dir / 'report.md'} and results.json")
