"""Load test of ``decodekit serve`` on loopback: C concurrent clients x R requests each, mixed
strategies, through the official ``openai`` client, against the same requests sent one at a
time to the same server.

    python benchmarks/serve_load.py --clients 16 --requests 4 --max_tokens 32

Prints completion tokens per second for both and the ratio; checks that every request
completed and that greedy (and the lossless prompt_lookup / ngram) replies equal offline
``decodekit.generate`` on the CLI's token ids. Model: the bundled one, float32 by default.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai

import decodekit as dk
from decodekit.model_info import context_length
from decodekit.serve.app import BackgroundServer, create_app
from decodekit.serve.engine import Engine

PROMPTS = ["What is the capital of France?", "List three prime numbers.", "Why is the sky blue?",
           "Write a haiku about the sea.", "Say hello in French.", "What is 12 times 7?",
           "Explain what a KV cache is in one sentence.", "Name a famous painting by Leonardo da Vinci."]
# Sampling without a seed, as most clients send it: such rows share one lane. A request with a
# ``seed`` gets a lane of its own (its generator serves its rows only), so it is not batched.
DECODINGS = [{"strategy": "greedy"}, {"strategy": "prompt_lookup"}, {"strategy": "sample", "temperature": 0.7},
             {"strategy": "ngram"}]
LOSSLESS = ("greedy", "prompt_lookup", "ngram")


def jobs(clients: int, requests: int) -> list[list[tuple[str, dict]]]:
    """Per client, its requests: (prompt, decoding)."""
    return [[(PROMPTS[(c * requests + r) % len(PROMPTS)], DECODINGS[(c + r) % len(DECODINGS)])
             for r in range(requests)] for c in range(clients)]


def send(client, model_id: str, prompt: str, decoding: dict, max_tokens: int):
    decoding = dict(decoding)
    temperature = decoding.pop("temperature", None)  # an OpenAI field, not a decoding option
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=temperature,
                                           extra_body={"decoding": decoding})
    return prompt, decoding, reply.choices[0].message.content, reply.usage.completion_tokens


def run_concurrent(client, model_id, plan, max_tokens):
    def one_client(requests):
        return [send(client, model_id, p, d, max_tokens) for p, d in requests]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        results = [r for client_results in pool.map(one_client, plan) for r in client_results]
    return results, time.perf_counter() - start


def run_serial(client, model_id, plan, max_tokens):
    start = time.perf_counter()
    results = [send(client, model_id, p, d, max_tokens) for requests in plan for p, d in requests]
    return results, time.perf_counter() - start


def check(results, model, tokenizer, max_tokens) -> tuple[int, list[dict]]:
    """Lossless replies vs offline generation: how many were checked, and the ones that differ."""
    expected, checked, differ = {}, 0, []
    for prompt, decoding, text, _ in results:
        if decoding["strategy"] not in LOSSLESS:
            continue
        if prompt not in expected:
            ids = dk.encode_prompts(tokenizer, [prompt], use_chat_template=True)
            out = dk.generate(model, ids, max_new_tokens=max_tokens, tokenizer=tokenizer)
            expected[prompt] = out.texts(tokenizer)[0]
        if text != expected[prompt]:
            differ.append({"strategy": decoding["strategy"], "prompt": prompt, "served": text,
                           "offline": expected[prompt]})
        checked += 1
    return checked, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--serial_requests", type=int, default=None,
                        help="one-at-a-time baseline on the first N requests only (default: all)")
    args = parser.parse_args()

    model, tokenizer = dk.load_model(dtype=args.dtype)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=4 * args.clients * args.requests)
    engine.start()
    model_id = dk.DEFAULT_MODEL
    server = BackgroundServer(create_app(engine, tokenizer, model_id, context=context_length(model))).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    plan = jobs(args.clients, args.requests)
    try:
        send(client, model_id, "hi", {"strategy": "greedy"}, 2)  # warm-up
        results, seconds = run_concurrent(client, model_id, plan, args.max_tokens)
        serial_plan = plan
        if args.serial_requests is not None:
            flat = [job for requests in plan for job in requests][: args.serial_requests]
            serial_plan = [flat]
        serial, serial_seconds = run_serial(client, model_id, serial_plan, args.max_tokens)
    finally:
        server.stop()
        engine.stop()
    tokens = sum(r[3] for r in results)
    serial_tokens = sum(r[3] for r in serial)
    checked, differ = check(results + serial, model, tokenizer, args.max_tokens)
    report = {
        "device": str(model.device), "dtype": args.dtype, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "completed": len(results),
        "concurrent": {"requests": len(results), "tokens": tokens, "seconds": round(seconds, 2),
                       "tokens_per_s": round(tokens / seconds, 2)},
        "one_at_a_time": {"requests": len(serial), "tokens": serial_tokens, "seconds": round(serial_seconds, 2),
                          "tokens_per_s": round(serial_tokens / serial_seconds, 2)},
        "lossless_replies_checked": checked,
        "lossless_replies_differing": differ,
    }
    report["speedup"] = round(report["concurrent"]["tokens_per_s"] / report["one_at_a_time"]["tokens_per_s"], 2)
    print(json.dumps(report, indent=2))
    if differ:
        raise SystemExit(f"{len(differ)} of {checked} lossless replies differ from offline greedy")


if __name__ == "__main__":
    main()
