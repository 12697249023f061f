"""Soak test of ``decodekit serve`` on loopback: a real server process, many clients, hostile
ones among them. Bounded in requests and in time; every connection is to 127.0.0.1.

    python benchmarks/serve_soak.py --clients 64 --requests 400 --max_tokens 16 [--output_dir DIR]

Mixed strategies (greedy, prompt_lookup, ngram, sample, beam) and options (n=2, logprobs, stop,
streams); about 10% of the streams are abandoned after their first events, 5% of the bodies are
malformed, 5% of the prompts are over the model's context. Reports p50/p99 latency of the
completed requests, completion tokens/s, responses by status, hangs (no answer within
``--request_timeout``), every completed lossless reply (greedy, prompt_lookup, ngram) compared
with offline ``decodekit.generate``, the server's RSS (after warm-up, after the first 50
requests, at the end) and its running rows and queue at the end. Exits 1 if a check fails: a
5xx, a hang, a differing lossless reply, rows or queue left, RSS growth >= 10%. With
``--output_dir`` the run is also written to ``DIR/report.md`` and ``DIR/results.json`` (with
its date, CPU model and command; ``reports.py``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
from reports import check_output_dir, write_report  # same directory
from serve_load import LOSSLESS, PROMPTS

import decodekit as dk

HOST = "127.0.0.1"
STOPS = [".", ",", "\n"]
MALFORMED = [
    b"{not json", b"[]", b'{"messages": "hi"}', b'{"messages": [{"role": "robot", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000000}',
    b'{"messages": [{"role": "user", "content": "x"}], "n": 1000000}',
    b'{"messages": [{"role": "user", "content": "x"}], "stop": ["", ""]}',
    b'{"messages": [{"role": "user", "content": "x"}], "decoding": {"strategy": "fastest"}}',
    b'{"messages": [{"role": "user", "content": "x"}], "decoding": {"strategy": "prompt_lookup", "gamma": -1}}',
    b"[" * 5000, b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
]


# ---------------------------------------------------------------------------- the plan
def plan(n: int, max_tokens: int, seed: int) -> list[dict]:
    """``n`` requests: ``{"kind", "body" (dict or raw bytes), "abandon", ...}``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.05:
            out.append({"kind": "malformed", "body": MALFORMED[i % len(MALFORMED)]})
        elif roll < 0.10:
            out.append({"kind": "over_context", "body": {"prompt": "word " * 9000, "max_tokens": 4}})
        else:
            out.append(_normal(rng, max_tokens, abandon=roll < 0.20))
    return out


def _normal(rng: random.Random, max_tokens: int, abandon: bool) -> dict:
    prompt = rng.choice(PROMPTS)
    strategy = rng.choice(["greedy", "greedy", "prompt_lookup", "ngram", "sample", "beam"])
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.choice([max_tokens // 2, max_tokens]),
            "decoding": {"strategy": strategy}}
    if strategy == "sample":
        body["temperature"] = 0.7
        body["n"] = rng.choice([1, 2])
    if strategy == "beam":
        body["decoding"]["num_beams"] = 2
    if strategy in ("greedy", "prompt_lookup") and rng.random() < 0.3:
        body.update(logprobs=True, top_logprobs=2)
    if strategy != "beam" and rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)
    body["stream"] = abandon or rng.random() < 0.3
    return {"kind": "abandon" if abandon else "normal", "body": body, "prompt": prompt, "strategy": strategy}


# ---------------------------------------------------------------------------- one request
def send(port: int, job: dict, timeout: float) -> dict:
    """Send one request; returns ``{"status", "seconds", "text", "tokens"}`` or ``{"status": "hang"}``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    body = job["body"] if isinstance(job["body"], bytes) else json.dumps(job["body"]).encode()
    start = time.perf_counter()
    try:
        path = "/v1/completions" if job["kind"] == "over_context" else "/v1/chat/completions"
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        result = {"status": response.status}
        if job["kind"] == "abandon" and response.status == 200:
            response.readline()
            response.readline()  # the first event, then go away
            result["status"] = "abandoned"
        elif response.status == 200 and isinstance(job["body"], dict) and job["body"].get("stream"):
            result.update(_read_stream(response))
        else:
            result.update(_read_whole(response, job))
    except TimeoutError:
        result = {"status": "hang"}
    except (ConnectionError, http.client.HTTPException) as exc:
        result = {"status": f"connection error: {type(exc).__name__}"}
    finally:
        conn.close()
    result["seconds"] = time.perf_counter() - start
    return result


def _read_whole(response, job: dict) -> dict:
    data = json.loads(response.read() or b"null")
    if response.status != 200:
        ok = isinstance(data, dict) and set(data.get("error", {})) == {"message", "type", "param", "code"}
        return {"error_shape_ok": ok}
    texts = [c["message"]["content"] for c in data["choices"]]
    return {"text": texts[0], "tokens": data["usage"]["completion_tokens"], "choices": len(texts)}


def _read_stream(response) -> dict:
    text, tokens, error = "", 0, None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            error = event["error"]
            continue
        for choice in event["choices"]:
            if choice["index"] == 0:
                text += choice["delta"].get("content") or ""
            tokens += len((choice.get("decodekit") or {}).get("tokens", []))
    return {"text": text, "tokens": tokens, "status": "stream error" if error else 200}


# ---------------------------------------------------------------------------- the server
def start_server(args) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "decodekit", "serve", "--host", HOST, "--port", str(port), "--dtype", args.dtype,
           "--max_batch_size", str(args.max_batch_size), "--max_queue", str(args.max_queue)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"))
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {args.server_log}")
        try:
            health(port)
            return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


def health(port: int) -> dict:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def settle(port: int, timeout: float = 30.0) -> dict:
    """``/health`` once no request runs or waits (abandoned ones leave at the next step)."""
    end = time.monotonic() + timeout
    while True:
        h = health(port)
        if not (h["running_requests"] or h["queue_length"] or h["running_rows"]) or time.monotonic() > end:
            return h
        time.sleep(0.1)


# ---------------------------------------------------------------------------- the run
def run(port: int, jobs: list[dict], args, rss) -> tuple[list[dict], dict]:
    """Every job through ``args.clients`` concurrent clients; the server's RSS after 50 answers
    (``rss``) and every 100 (``every_100``, MB)."""
    done, lock, first50 = [0], threading.Lock(), {}
    deadline = time.monotonic() + args.max_seconds

    def one(job):
        if time.monotonic() > deadline:
            return {"status": "skipped (time budget)"}
        result = send(port, job, args.request_timeout)
        with lock:
            done[0] += 1
            if done[0] == 50:
                first50["rss"] = rss()
            if done[0] % 100 == 0:
                first50.setdefault("every_100", []).append(round(rss() / 2**20, 1))
        return result

    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(one, jobs))
    for job, result in zip(jobs, results, strict=True):
        result["job"] = job
    return results, first50


def offline_check(results: list[dict], dtype: str) -> tuple[int, list[dict]]:
    """Completed lossless replies (n=1) vs offline generate for the same prompt and max_tokens,
    its text cut before the stop sequence as the server cuts it."""
    model, tokenizer = dk.load_model(dtype=dtype)
    cache, checked, differ = {}, 0, []
    for r in results:
        job = r["job"]
        if job["kind"] != "normal" or r["status"] != 200 or job.get("strategy") not in LOSSLESS:
            continue
        key = (job["prompt"], job["body"]["max_tokens"])
        if key not in cache:
            ids = dk.encode_prompts(tokenizer, [job["prompt"]], use_chat_template=True)
            cache[key] = dk.generate(model, ids, max_new_tokens=key[1], tokenizer=tokenizer).texts(tokenizer)[0]
        want = cache[key]
        stop = job["body"].get("stop")
        if stop and stop in want:
            want = want[: want.find(stop)]
        checked += 1
        if r["text"] != want:
            differ.append({"strategy": job["strategy"], "prompt": job["prompt"], "served": r["text"], "offline": want})
    return checked, differ


def summarize(results, seconds, rss_points, at_end, checked, differ) -> dict:
    ok = [r for r in results if r["status"] == 200]
    lat = sorted(r["seconds"] for r in ok)
    tokens = sum(r.get("tokens", 0) for r in ok)
    statuses = Counter(f"{r['job']['kind']}:{r['status']}" for r in results)
    shapes = [r.get("error_shape_ok") for r in results if "error_shape_ok" in r]
    return {
        "requests": len(results), "seconds": round(seconds, 1), "completed": len(ok),
        "latency_s": {"p50": round(statistics.median(lat), 3) if lat else None,
                      "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None},
        "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
        "responses": dict(sorted(statuses.items())),
        "5xx": sum(isinstance(r["status"], int) and r["status"] >= 500 for r in results),
        "hangs": sum(r["status"] == "hang" for r in results),
        "error_bodies_in_openai_shape": f"{sum(map(bool, shapes))}/{len(shapes)}",
        "lossless_replies_checked": checked, "lossless_replies_differing": differ,
        "rss_mb": {k: round(v / 2**20, 1) if v else None for k, v in rss_points.items()},
        "at_end": {k: at_end[k] for k in ("running_requests", "queue_length", "running_rows")},
    }


def failures(report: dict) -> list[str]:
    out = []
    if report["5xx"] or report["hangs"]:
        out.append(f"{report['5xx']} 5xx, {report['hangs']} hangs")
    if report["lossless_replies_differing"]:
        out.append(f"{len(report['lossless_replies_differing'])} lossless replies differ")
    if any(report["at_end"].values()):
        out.append(f"left at the end: {report['at_end']}")
    rss = report["rss_mb"]
    if rss["after_50"] and rss["end"] > 1.1 * rss["after_50"]:
        out.append(f"RSS grew {rss['end'] / rss['after_50'] - 1:.1%} after the first 50 requests")
    return out


def report_lines(report: dict, problems: list[str]) -> list[str]:
    """The soak's table for report.md."""
    rss = report["rss_mb"]
    growth = f"{rss['end'] / rss['after_50'] - 1:+.1%}" if rss["after_50"] else "–"
    rows = [("requests / completed", f"{report['requests']} / {report['completed']}"),
            ("responses by kind:status", ", ".join(f"{k} {v}" for k, v in report["responses"].items())),
            ("5xx / hangs", f"{report['5xx']} / {report['hangs']}"),
            ("error bodies in OpenAI's shape", report["error_bodies_in_openai_shape"]),
            ("lossless replies equal to offline generate",
             f"{report['lossless_replies_checked'] - len(report['lossless_replies_differing'])}"
             f"/{report['lossless_replies_checked']}"),
            ("latency of completed requests", f"p50 {report['latency_s']['p50']} s, p99 {report['latency_s']['p99']} s"),
            ("completion tokens/s", str(report["tokens_per_s"])),
            ("running requests / queue / rows at the end", " / ".join(map(str, report["at_end"].values()))),
            ("server RSS (MB)", f"{rss['after_warm_up']} after warm-up, {rss['after_50']} after 50 answers, "
                                f"{rss['end']} at the end: {growth}"),
            ("RSS every 100 answers (MB)", ", ".join(map(str, report["rss_mb_every_100_answers"])) or "–"),
            ("exit status after SIGTERM", str(report["server_exit_status_after_sigterm"])),
            ("checks", "; ".join(problems) or "all passed")]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--max_queue", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request_timeout", type=float, default=600.0, help="seconds before a request is a hang")
    parser.add_argument("--max_seconds", type=float, default=1800.0, help="no new request after this")
    parser.add_argument("--server_log", default=os.devnull)
    parser.add_argument("--output_dir", default=None, help="write report.md and results.json here (a new directory)")
    args = parser.parse_args()
    out_dir = check_output_dir(parser, args.output_dir)
    proc, port = start_server(args)
    server = psutil.Process(proc.pid)
    try:
        warm = send(port, {"kind": "normal", "body": {"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2}}, args.request_timeout)
        assert warm["status"] == 200, warm
        rss_start = server.memory_info().rss
        start = time.perf_counter()
        results, samples = run(port, plan(args.requests, args.max_tokens, args.seed), args,
                               lambda: server.memory_info().rss)
        seconds = time.perf_counter() - start
        at_end = settle(port)
        rss_points = {"after_warm_up": rss_start, "after_50": samples.get("rss"), "end": server.memory_info().rss}
    finally:
        proc.terminate()
        exit_code = proc.wait(timeout=120)
    checked, differ = offline_check(results, args.dtype)
    report = summarize(results, seconds, rss_points, at_end, checked, differ)
    report["rss_mb_every_100_answers"] = samples.get("every_100", [])
    report.update(clients=args.clients, max_tokens=args.max_tokens, max_batch_size=args.max_batch_size,
                  dtype=args.dtype, server_exit_status_after_sigterm=exit_code)
    print(json.dumps(report, indent=2))
    problems = failures(report) + ([f"exit status {exit_code} after SIGTERM"] if exit_code else [])
    if out_dir is not None:
        write_report(out_dir, f"Soak of decodekit serve ({args.requests} requests, {args.clients} clients)",
                     report_lines(report, problems), {"report": report, "problems": problems})
    if problems:
        raise SystemExit("; ".join(problems))


if __name__ == "__main__":
    main()
