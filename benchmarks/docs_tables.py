"""Regenerate the documentation's performance tables from the committed benchmark reports.

Every number in README.md and docs/ comes from a report that ``decodekit bench`` wrote under
``benchmarks/results/<run>/results.json`` (machine card, exact command, every summary row).
This script renders the tables between marker comments::

    <!-- table: NAME -->
    ...generated...
    <!-- /table -->

in ``docs/performance.md`` and ``README.md``, and the table of a benchmark script's report
(``benchmarks/reports.py``) between ``<!-- report: RUN -->`` and ``<!-- /report -->``. Each table starts with its provenance line: the
date, the CPU model, cores and torch threads, the software versions, the exact command, and a
link to the report. ``tests/test_docs.py`` fails when the committed tables differ from what
this script generates, so a number cannot drift from its report.

    python benchmarks/docs_tables.py            # rewrite the tables in place
    python benchmarks/docs_tables.py --check    # exit 1 if any table is out of date
    python benchmarks/docs_tables.py --record-dates   # add new runs to results/dates.json (from git)

The date of a run is its card's ``date`` when the bench wrote one, else the date of the commit
that added its ``results.json``, recorded once in ``benchmarks/results/dates.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATES = RESULTS / "dates.json"
TARGETS = [ROOT / "docs" / "performance.md", ROOT / "docs" / "models.md", ROOT / "docs" / "server.md",
           ROOT / "docs" / "structured-output.md", ROOT / "README.md"]
MARKER = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
# the table of a benchmark script's report (benchmarks/reports.py: report.md + results.json)
REPORT_MARKER = re.compile(r"(<!-- report: ([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.S)

# column name -> (header, formatter of a summary row)
def _num(key, digits=1):
    return lambda r: "–" if r.get(key) is None else f"{r[key]:.{digits}f}"


COLUMNS = {
    "strategy": ("strategy", lambda r: r["strategy"] + (f" (γ {r['gamma']})" if r.get("swept") else "")),
    "impl": ("implementation", lambda r: r["impl"]),
    "dtype": ("dtype", lambda r: r["dtype"]),
    "batch": ("batch", lambda r: str(r["batch_size"])),
    "tok_s": ("tokens/s", _num("tokens_per_s")),
    "x_greedy": ("x our greedy", _num("x_greedy", 2)),
    "x_tf": ("x transformers", _num("x_transformers", 2)),
    "decode_x": ("decode x greedy", _num("decode_x_greedy", 2)),  # without the prefill
    # llama.cpp's own rows are not counted by the bench's forward hook
    "fwd": ("forwards/token", lambda r: "–" if r["impl"] == "llama.cpp" else _num("forwards_per_token", 2)(r)),
    "acc": ("acceptance", _num("acceptance_rate", 2)),
    "same": ("= greedy rows", lambda r: r.get("identical_to_greedy") or "–"),
    "loglik": ("log-lik/token", lambda r: _quality(r, "loglik_per_token", "{:.2f}")),
    "exact": ("qa exact match", lambda r: _quality(r, "exact_match", "{:.0%}")),
    "grounded": ("grounded tokens/s", lambda r: _suite(r, "grounded")),
    "chat": ("chat tokens/s", lambda r: _suite(r, "chat")),
}


def _quality(row, key, fmt):
    value = (row.get("quality") or {}).get(key)
    return "–" if value is None else fmt.format(value)


def _suite(row, suite):
    value = (row.get("suites") or {}).get(suite)
    return "–" if value is None else f"{value:.1f}"


@dataclass
class Table:
    """One generated table: which run, which summary rows, which columns."""

    run: str
    columns: list[str]
    impls: tuple[str, ...] = ("decodekit", "transformers", "llama.cpp")
    strategies: tuple[str, ...] | None = None  # None: all but the floor
    dtypes: tuple[str, ...] | None = None
    batches: tuple[int, ...] | None = None
    swept: bool = False  # include the --gammas sweep rows
    floor: bool = False  # include the bare forward loop's rows
    extra: dict = field(default_factory=dict)

    def rows(self, summary: list[dict]) -> list[dict]:
        keep = []
        for r in summary:
            if r["strategy"] == "floor":
                if self.floor:
                    keep.append(r)
                continue
            if r["impl"] not in self.impls or r.get("error"):
                continue
            if self.strategies and r["strategy"] not in self.strategies:
                continue
            if self.dtypes and r["dtype"] not in self.dtypes:
                continue
            if self.batches and r["batch_size"] not in self.batches:
                continue
            if r.get("swept") and not self.swept:
                continue
            keep.append(r)
        return keep


BASIC = ["strategy", "impl", "dtype", "batch", "tok_s", "x_greedy", "x_tf", "fwd", "acc", "same"]
TABLES: dict[str, Table] = {
    "readme-snapshot": Table("cpu-lossless-fp32", BASIC, batches=(1,)),
    "foundation": Table("cpu-foundation", ["impl", "dtype", "batch", "tok_s", "x_greedy", "x_tf"], floor=True),
    "lossless-fp32": Table("cpu-lossless-fp32", BASIC + ["chat", "grounded"]),
    "all-bf16": Table("cpu-all-bf16", BASIC + ["chat", "grounded"]),
    "dtypes-speed": Table("cpu-quant-greedy", ["impl", "dtype", "batch", "tok_s", "x_tf"]),
    "dtypes-quality": Table("cpu-quant-qa", ["dtype", "tok_s", "loglik", "exact"]),
    "int8-quality": Table("cpu-int8-kernel-qa", ["dtype", "tok_s", "loglik", "exact"]),
    "llamacpp-q4_0": Table("cpu-llamacpp-q4_0", BASIC),
    "llamacpp-q4_1": Table("cpu-llamacpp-2", BASIC),
    "llamacpp-q4_0-rerun": Table("cpu-llamacpp-q4_0-2", BASIC),
    "eagle": Table("cpu-eagle-int8-gqa", BASIC + ["chat", "grounded"]),
    "eagle-hybrid": Table("cpu-eagle-hybrid-int8-gqa", BASIC + ["chat", "grounded"]),
    "lookup-fp32": Table("cpu-eagle", BASIC + ["chat", "grounded"], strategies=("greedy", "prompt_lookup", "ngram")),
    "hybrid-bf16-grounded": Table("cpu-hybrid-bf16-grounded", BASIC),
    "int8-drafting": Table("cpu-int8-drafting", BASIC, impls=("decodekit",)),
    "lookup-int8-llamacpp-amd": Table("cpu-llamacpp-lookup-amd", BASIC, impls=("decodekit",)),
    "dtype-default": Table("cpu-dtype-default", ["strategy", "dtype", "batch", "tok_s", "x_greedy", "fwd", "acc", "same"],
                           impls=("decodekit",)),
}


def load(run: str) -> dict:
    return json.loads((RESULTS / run / "results.json").read_text(encoding="utf-8"))


def run_date(run: str, report: dict) -> str:
    date = report["card"].get("date")
    if date:
        return str(date)[:10]
    dates = json.loads(DATES.read_text(encoding="utf-8")) if DATES.exists() else {}
    if run not in dates:
        raise SystemExit(f"no date for {run}: run `python benchmarks/docs_tables.py --record-dates`")
    return dates[run]["date"]


def _trials(cfg: dict) -> str:
    n = cfg.get("trials", "?")
    return f"{n} interleaved trial{'' if n == 1 else 's'}"


def scratch_command(run: str, command: str) -> str:
    """The run's command, safe to copy: ``--output_dir`` points at a scratch directory (the
    report records where it was written) and an empty ``--gammas`` value is quoted."""
    command = re.sub(r"--gammas (?=--|$)", "--gammas '' ", command.replace("--gammas  ", "--gammas '' "))
    command = re.sub(r"--output_dir \S+", f"--output_dir /tmp/decodekit-bench/{run}", command)
    return command.strip()


def provenance(run: str, report: dict, link_prefix: str) -> str:
    card = report["card"]
    where = f"{card['cpu']}, {card['cpu_cores']} cores, torch threads {card['torch_threads']}"
    if card.get("gpu"):
        where += f", {card['gpu']}"
    software = f"torch {card['torch']}, transformers {card['transformers']}"
    cfg = report.get("config", {})
    clock = "process CPU seconds" if cfg.get("clock") == "cpu" else "wall clock"
    return (f"Measured {run_date(run, report)} on {where} ({software}; {card['model']}; "
            f"{_trials(cfg)}, median, {clock}). "
            f"Report: [{run}]({link_prefix}benchmarks/results/{run}/report.md).\n"
            f"Command (`--output_dir` pointed at a scratch directory): `{scratch_command(run, report['command'])}`\n")  # a blank line follows, then the table


def render(name: str, link_prefix: str) -> str:
    spec = TABLES[name]
    report = load(spec.run)
    rows = spec.rows(report["summary"])
    if not rows:
        raise SystemExit(f"table {name}: no rows selected from {spec.run}")
    head = [COLUMNS[c][0] for c in spec.columns]
    lines = [provenance(spec.run, report, link_prefix),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(COLUMNS[c][1](r)) for c in spec.columns) + " |")
    return "\n".join(lines) + "\n"


def render_report(run: str, link_prefix: str) -> str:
    """A script report's provenance line and its table, copied from its report.md."""
    card = load(run)["card"]
    command = re.sub(r"--output_dir \S+", f"--output_dir /tmp/decodekit-bench/{run}", card["command"])
    table = [line for line in (RESULTS / run / "report.md").read_text(encoding="utf-8").splitlines()
             if line.startswith("|")]
    if not table:
        raise SystemExit(f"report {run}: no table in its report.md")
    return (f"Measured {card['date']} on {card['cpu']} ({card['cpu_capability']} kernels), torch threads "
            f"{card['torch_threads']} (torch {card['torch']}, decodekit {card['decodekit']}). "
            f"Report: [{run}]({link_prefix}benchmarks/results/{run}/report.md).\n"
            f"Command (`--output_dir` pointed at a scratch directory): `{command}`\n\n" + "\n".join(table) + "\n")


def regenerate(text: str, link_prefix: str) -> str:
    text = MARKER.sub(lambda m: m.group(1) + render(m.group(2), link_prefix) + m.group(4), text)
    return REPORT_MARKER.sub(lambda m: m.group(1) + render_report(m.group(2), link_prefix) + m.group(4), text)


def link_prefix(target: Path) -> str:
    depth = len(target.relative_to(ROOT).parts) - 1
    return "../" * depth


def record_dates() -> None:
    dates = json.loads(DATES.read_text(encoding="utf-8")) if DATES.exists() else {}
    for path in sorted(RESULTS.glob("*/results.json")):
        run = path.parent.name
        if run in dates:
            continue
        out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%cs %h", "--", str(path)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        if not out:
            raise SystemExit(f"{path} is not committed yet: commit it, then record its date")
        dates[run] = {"date": out[-2], "commit": out[-1], "source": "date of the commit that added results.json"}
    DATES.write_text(json.dumps(dates, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    parser.add_argument("--record-dates", action="store_true", help="record new runs' dates from git")
    args = parser.parse_args(argv)
    if args.record_dates:
        record_dates()
    stale = []
    for target in TARGETS:
        text = target.read_text(encoding="utf-8")
        new = regenerate(text, link_prefix(target))
        if new != text:
            stale.append(target.relative_to(ROOT))
            if not args.check:
                target.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python benchmarks/docs_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
