"""llguidance vs xgrammar on the bundled tokenizer: compile time and per-token mask time.

Each engine compiles a few JSON Schemas (and one regex), then walks the tokens of a valid
output computing the next-token mask at every position, as decoding does. Times are the
median over the walk, on one thread; the tokenizer is converted once per model (cached).

    OMP_NUM_THREADS=1 python benchmarks/constraint_engines.py [--output_dir DIR]

``pip install llguidance xgrammar`` first (xgrammar is only needed here; ``pip install --no-deps
xgrammar apache-tvm-ffi`` keeps it from pulling a CUDA build of torch and triton). With
``--output_dir`` the table also goes to ``DIR/report.md`` and ``DIR/results.json`` (``reports.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import metadata

import torch
from reports import check_output_dir, write_report  # same directory

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                                   "tags": {"type": "array", "items": {"type": "string"},
                                                            "maxItems": 3}},
                 "required": ["id", "tags"]},
        "status": {"enum": ["ok", "error", "pending"]}}, "required": ["user", "status"]},
    "pattern": {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                                 "score": {"type": "number"}}, "required": ["date", "score"]},
}
SAMPLES = {
    "flat": {"name": "Ada Lovelace", "age": 36},
    "nested": {"user": {"id": 7, "tags": ["alpha", "beta"]}, "status": "pending"},
    "pattern": {"date": "2024-05-01", "score": 3.25},
}


def bundled_tokenizer():
    from transformers import AutoTokenizer

    from decodekit.models import BUNDLED_MODELS

    gguf = BUNDLED_MODELS["smollm2-135m-instruct"].gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def walk(tokens, compute, consume) -> float:
    """Median seconds of one mask computation over the walk."""
    times = []
    for t in tokens:
        start = time.perf_counter()
        compute()
        times.append(time.perf_counter() - start)
        consume(t)
    return statistics.median(times)


def bench_llguidance(tok, schema, tokens):
    import llguidance
    import llguidance.hf

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))
    m.compute_bitmask()  # first mask: llguidance compiles lazily
    compile_s = time.perf_counter() - start
    m.reset()
    mask = walk(tokens, m.compute_bitmask, m.consume_token)
    assert not m.is_error(), m.get_error()
    return setup_s, compile_s, mask


def bench_xgrammar(tok, schema, tokens):
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema))
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    m.fill_next_token_bitmask(bitmask)
    compile_s = time.perf_counter() - start
    m.reset()
    mask = walk(tokens, lambda: m.fill_next_token_bitmask(bitmask), m.accept_token)
    return setup_s, compile_s, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=None, help="write report.md and results.json here (a new directory)")
    args = parser.parse_args()
    out_dir = check_output_dir(parser, args.output_dir)
    torch.set_num_threads(1)
    tok = bundled_tokenizer()
    rows, data = [], []
    print(f"{'schema':8} {'engine':11} {'tokenizer ms':>12} {'compile ms':>10} {'mask us/token':>14} tokens")
    for name, schema in SCHEMAS.items():
        tokens = tok.encode(json.dumps(SAMPLES[name]), add_special_tokens=False)
        for engine, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            try:
                setup_s, compile_s, mask = fn(tok, schema, tokens)
            except ImportError:
                print(f"{name:8} {engine:11} (not installed)")
                continue
            print(f"{name:8} {engine:11} {setup_s * 1e3:12.0f} {compile_s * 1e3:10.1f} {mask * 1e6:14.0f} {len(tokens)}")
            rows.append(f"| {name} | {engine} {metadata.version(engine)} | {setup_s * 1e3:.0f} ms | "
                        f"{compile_s * 1e3:.1f} ms | {mask * 1e6:.0f} us | {len(tokens)} |")
            data.append({"schema": name, "engine": engine, "version": metadata.version(engine),
                         "tokenizer_s": setup_s, "compile_s": compile_s, "mask_s_per_token": mask})
    if out_dir is not None:
        table = ["| schema | engine | tokenizer setup (once) | compile | mask / token | tokens |",
                 "|---|---|---:|---:|---:|---:|", *rows]
        write_report(out_dir, "Constraint engines on the bundled tokenizer (one thread)", table, {"rows": data})


if __name__ == "__main__":
    main()
