"""A longer schemathesis run against ``decodekit serve``'s OpenAPI schema than the test's
(``tests/test_serve_fuzz.py``): in-process ASGI, a tiny random Llama with the bundled tokenizer.

    python benchmarks/serve_fuzz.py --examples 400 --seed 1 [--output_dir DIR]

For every endpoint, valid bodies (and invalid ones for the POST endpoints), each checked: no
5xx, a documented status, content type and body (errors in OpenAI's shape), invalid bodies
refused. Prints requests sent and failures per endpoint and mode, then the server's state
(running requests, queue) at the end; exits 1 on any failure. With ``--output_dir`` the run
is also written to ``DIR/report.md`` and ``DIR/results.json`` (``reports.py``).
"""

from __future__ import annotations

import argparse
import builtins
import json
import time

import schemathesis
from fastapi.testclient import TestClient
from reports import check_output_dir, write_report  # same directory
from schemathesis import GenerationMode
from transformers import AutoTokenizer

from decodekit.models import BUNDLED_MODELS
from decodekit.serve.fuzz import OPERATIONS, build_fuzz_app, fuzz_operation

# hypothesis raises an exception group for several distinct failures (Python >= 3.11)
FAILURES = (Exception, getattr(builtins, "BaseExceptionGroup", Exception))


def bundled_tokenizer():
    gguf = BUNDLED_MODELS["smollm2-135m-instruct"].gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def wait_idle(app, timeout: float = 30.0) -> dict:
    """``/health`` once nothing runs (a cancelled request leaves at the next step), or at ``timeout``."""
    end = time.monotonic() + timeout
    with TestClient(app) as client:
        while True:
            health = client.get("/health").json()
            if not (health["running_requests"] or health["queue_length"]) or time.monotonic() > end:
                return health
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400, help="per endpoint and mode")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output_dir", default=None, help="write report.md and results.json here (a new directory)")
    args = parser.parse_args()
    out_dir = check_output_dir(parser, args.output_dir)
    app, engine = build_fuzz_app(bundled_tokenizer())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    results, failed, start = [], 0, time.perf_counter()
    try:
        for path, method in OPERATIONS:
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else [])
            for mode in modes:
                row = {"endpoint": f"{method} {path}", "mode": mode.value}
                try:
                    row["sent"] = fuzz_operation(schema, path, method, mode, args.examples, seed=args.seed)
                    row["failure"] = None
                except FAILURES as exc:  # reported; the run goes on
                    row["failure"] = str(exc)[:2000]
                    failed += 1
                print(json.dumps(row), flush=True)
                results.append(row)
        health = wait_idle(app)
    finally:
        engine.stop()
    report = {"examples_per_endpoint_and_mode": args.examples, "seed": args.seed,
              "requests_sent": sum(r.get("sent", 0) for r in results), "failures": failed,
              "seconds": round(time.perf_counter() - start, 1),
              "at_end": {k: health.get(k) for k in ("running_requests", "queue_length", "running_rows")}}
    print(json.dumps(report, indent=2))
    if out_dir is not None:
        table = ["| endpoint | mode | requests | failure |", "|---|---|---:|---|",
                 *(f"| {r['endpoint']} | {r['mode']} | {r.get('sent', '–')} | {(r['failure'] or 'none').splitlines()[0].replace('|', '/')} |"
                   for r in results),
                 "", f"{report['requests_sent']} requests, {failed} failures, {report['seconds']} s; "
                 f"at the end: {report['at_end']}"]
        write_report(out_dir, f"Schema fuzzing of decodekit serve ({args.examples} examples per endpoint and mode)",
                     table, {"report": report, "rows": results})
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
