"""Per-token cost of a JSON Schema constraint on the bundled model, batch 1: unconstrained
greedy, constrained greedy, and prompt lookup with the schema (which equals constrained greedy
token for token). Each run is repeated and the best time per token kept.

    OMP_NUM_THREADS=2 python benchmarks/constraint_overhead.py [--dtype float32] [--repeats 3] \
        [--output_dir DIR]

With ``--output_dir`` the table is also written to ``DIR/report.md`` with its date, CPU model
and command (a new directory only: a finished report is never overwritten).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

import decodekit

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "skills": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["name", "age", "email", "skills"], "additionalProperties": False}
PROMPT = ("Extract the person as JSON with name, age, email and skills. Text: Maria Lopez, 34, "
          "maria.lopez@example.com, knows Python, SQL and Rust.")


def run(model, tok, ids, mask, repeats: int, **kw) -> tuple[float, int, float, int, int]:
    """Best seconds per token, tokens, mask seconds, forced tokens and forwards of one setting."""
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = decodekit.generate(model, ids, mask, max_new_tokens=64, tokenizer=tok, **kw)
        per_token = (time.perf_counter() - start) / out.stats[0].new_tokens
        if best is None or per_token < best[0]:
            stat = out.stats[0]
            best = (per_token, stat.new_tokens, stat.mask_seconds, stat.forced_tokens, stat.forward_passes)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default=None, help="write report.md here (a new directory)")
    args = parser.parse_args()
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
        parser.error(f"--output_dir {out_dir} is not empty: a finished report is never overwritten")
    model, tok = decodekit.load_model(dtype=args.dtype)
    ids, mask = (decodekit.encode_prompts(tok, [PROMPT], use_chat_template=True), None)
    settings = {"greedy": {}, "greedy + schema": {"json_schema": SCHEMA},
                "prompt_lookup + schema": {"json_schema": SCHEMA, "strategy": "prompt_lookup"},
                "prompt_lookup fixed + schema": {"json_schema": SCHEMA, "strategy": "prompt_lookup",
                                                 "draft_policy": "fixed"}}
    base, rows = None, []
    print(f"{'setting':28} {'ms/token':>8} {'vs greedy':>9} {'tokens':>6} {'forwards':>8} {'mask ms':>7} {'forced':>6}")
    with torch.inference_mode():
        for name, kw in settings.items():
            per_token, tokens, mask_s, forced, forwards = run(model, tok, ids, mask, args.repeats, **kw)
            base = base or per_token
            rows.append(f"| {name} | {per_token * 1e3:.1f} | {per_token / base:.3f} | {tokens} | {forwards} | "
                        f"{mask_s * 1e3:.1f} | {forced} |")
            print(f"{name:28} {per_token * 1e3:8.1f} {per_token / base:9.3f} {tokens:6d} {forwards:8d} "
                  f"{mask_s * 1e3:7.1f} {forced:6d}")
    if out_dir is not None:
        write_report(out_dir, args, rows)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def write_report(out_dir: Path, args, rows: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Cost of a JSON Schema constraint (bundled model, batch 1)", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {cpu_model()}, {torch.get_num_threads()} torch threads",
        f"- software: torch {torch.__version__}, decodekit {decodekit.__version__}, dtype {args.dtype}",
        f"- command: `{' '.join(['python', *sys.argv])}`", "",
        "| setting | ms / token | vs greedy | tokens | forwards | mask ms | forced |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, ""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out_dir / 'report.md'}")


if __name__ == "__main__":
    main()
