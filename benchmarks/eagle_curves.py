"""Learning curves of the EAGLE draft head: held-out acceptance against optimizer steps, data
size and prompt diversity.

    python benchmarks/eagle_data.py --out DATA            # the target's answers (once)
    python benchmarks/eagle_curves.py --data DATA --output_dir DIR [--steps 400] [--runs steps,size,diversity]

Every run trains a fresh head (``decodekit.strategies.eagle.train.train``, the recipe of
``TrainConfig``) on part of ``DATA`` and measures, every ``--eval_every`` steps, greedy acceptance
by draft depth (1..5) teacher-forced on three held-out sets: a validation split of the training
answers, the chat suite, and ``eagle_data.OTHER_PROMPTS`` (kinds and subjects training has not
seen). Runs:

- ``steps``: all the training data, ``--steps`` steps;
- ``size``: 1/8, 1/4 and 1/2 of the training answers (same prompts' kinds), ``--steps // 2`` steps;
- ``diversity``: the same number of answers from 1, 3 and all 12 prompt kinds, ``--steps // 2`` steps.

Writes ``report.md``, ``results.json`` and ``curves.png`` into a new ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from reports import check_output_dir, write_report

import decodekit as dk
from decodekit.strategies.eagle.head import EagleHead
from decodekit.strategies.eagle.train import TrainConfig, draft_vocabulary, train

SETS = ("validation", "chat", "other")
TOPK = (1, 2, 3, 4, 8)  # --heads: depth-1 top-k hit rates, what a tree of k first drafts could accept


def load(data: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """Training answers (each with its ``kind``) and the held-out sets of ``eagle_data.py``."""
    samples = []
    for path in sorted(data.glob("train_*.pt")) + sorted(data.glob("passage_*.pt")):
        shard = torch.load(path, weights_only=False)
        for s, kind in zip(shard["samples"], shard["kinds"]):
            samples.append(dict(s, kind=kind))
    heldout = {n: torch.load(data / f"heldout_{n}.pt", weights_only=False)["samples"] for n in ("chat", "other")}
    return samples, heldout


def tokens_of(samples: list[dict]) -> int:
    return sum(int((s["greedy"] >= 0).sum()) for s in samples)


def run(model, name: str, samples: list[dict], heldout: dict, steps: int, args) -> dict:
    """One fresh head trained on ``samples``; its evaluations."""
    torch.manual_seed(0)
    vocab = draft_vocabulary(samples, args.draft_vocab, model.get_output_embeddings().weight.shape[0])
    head = EagleHead(model, vocab).cast(torch.float32)
    cfg = TrainConfig(steps=steps, eval_every=args.eval_every, batch_size=args.batch_size, lr=args.lr,
                      depth=args.depth, distill=args.distill, draft_vocab=args.draft_vocab)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:  # the loop's checkpoints
        summary = train(head, samples, cfg, Path(folder), monitors=heldout)
    result = dict(name=name, answers=len(samples), tokens=tokens_of(samples), steps=steps,
                  kinds=sorted({s["kind"] for s in samples}), seconds=round(time.perf_counter() - t0, 1),
                  best_step=summary["best_step"], evals=summary["evals"])
    print(json.dumps({k: v for k, v in result.items() if k != "evals"}), flush=True)
    for e in summary["evals"]:
        print(e["step"], {k: e[k]["acceptance_by_depth"] for k in SETS}, flush=True)
    return result


def measure_heads(model, folders: list[str], heldout: dict) -> list[dict]:
    """Trained heads (``--heads DIR,...``) measured on the held-out sets the same way."""
    from decodekit.strategies.eagle.recipe import acceptance, expected_accepted, topk_hits
    from decodekit.strategies.eagle.storage import load_head, shipped_head_dir
    from decodekit.strategies.eagle.train import vocab_index

    out = []
    for folder in folders:
        path = shipped_head_dir(model) if folder == "shipped" else Path(folder)
        head = load_head(path, model).cast(torch.float32)
        card = json.loads((path / "card.json").read_text())  # which head: its hash, data and steps
        rates = {n: acceptance(head, s, 5, vocab_index(head)) for n, s in heldout.items()}
        tops = {n: topk_hits(head, s, TOPK, vocab_index(head)) for n, s in heldout.items()}
        out.append(dict(head=folder, sha256=card["head_sha256"][7:19], tokens=card["data"]["generated_tokens"],
                        steps=card["training"]["steps"], **{n: dict(acceptance_by_depth=r, mean_accepted=expected_accepted(r),
                                                                    depth1_topk={k: t for k, t in zip(TOPK, tops[n])})
                                                           for n, r in rates.items()}))
        print(json.dumps(out[-1]), flush=True)
    return out


def subsets(samples: list[dict], run_names: list[str], steps: int) -> list[tuple[str, list[dict], int]]:
    """``(name, samples, steps)`` of every run asked for."""
    rng = random.Random(0)
    shuffled = rng.sample(samples, len(samples))
    todo = []
    if "steps" in run_names:
        todo.append(("all", samples, steps))
    if "size" in run_names:
        todo += [(f"size_1/{d}", shuffled[: len(samples) // d], steps // 2) for d in (8, 4, 2)]
    if "diversity" in run_names:
        by_kind: dict[str, list[dict]] = {}
        for s in shuffled:
            by_kind.setdefault(s["kind"], []).append(s)
        order = ["explain", "writing", "code"] + sorted(k for k in by_kind if k not in ("explain", "writing", "code"))
        count = min(len(by_kind[order[0]]), len(samples) // 12)
        for k in (1, 3, len(order)):
            pool = [s for kind in order[:k] for s in by_kind[kind]]
            todo.append((f"kinds_{k}", rng.sample(pool, count), steps // 2))
    return todo


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    main = next((r for r in results if r["name"] == "all"), None)
    if main:
        for depth in range(3):
            for name, style in zip(SETS, ("-", "--", ":")):
                axes[0].plot([e["step"] for e in main["evals"]],
                             [e[name]["acceptance_by_depth"][depth] for e in main["evals"]], style,
                             color=f"C{depth}", label=f"depth {depth + 1}, {name}")
        axes[0].set(title=f"all data ({main['tokens'] // 1000}k tokens): acceptance vs steps", xlabel="optimizer step",
                    ylabel="acceptance (greedy, teacher-forced)")
        axes[0].legend(fontsize=7)
    for ax, prefix, label in ((axes[1], "size", "training tokens"), (axes[2], "kinds", "prompt kinds")):
        runs = [r for r in results if r["name"].startswith(prefix) or (prefix == "size" and r["name"] == "all")]
        runs.sort(key=lambda r: r["tokens"] if prefix == "size" else len(r["kinds"]))
        xs = [r["tokens"] if prefix == "size" else len(r["kinds"]) for r in runs]
        for name, style in zip(SETS, ("-o", "--o", ":o")):
            best = [max(e[name]["acceptance_by_depth"][0] for e in r["evals"]) if r["evals"] else 0 for r in runs]
            ax.plot(xs, best, style, label=f"depth 1, {name} (best eval)")
        ax.set(title=f"acceptance vs {label}", xlabel=label, ylabel="depth-1 acceptance")
        if prefix == "size":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list[dict]) -> list[str]:
    lines = ["| run | answers | tokens | steps | best step | " + " | ".join(f"{s} d1..d5 (mean acc.)" for s in SETS)
             + " | seconds |", "|---" * 9 + "|"]
    for r in results:
        e = next((e for e in r["evals"] if e["step"] == r["best_step"]), r["evals"][-1] if r["evals"] else None)
        cells = [" / ".join(f"{x:.2f}" for x in e[s]["acceptance_by_depth"]) + f" ({e[s]['mean_accepted']:.2f})"
                 for s in SETS] if e else ["-"] * 3
        lines.append(f"| {r['name']} | {r['answers']} | {r['tokens']} | {r['steps']} | {r['best_step']} | "
                     + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--runs", default="steps,size,diversity")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--distill", type=float, default=0.5)
    parser.add_argument("--draft_vocab", type=int, default=8192)
    parser.add_argument("--heads", default="", help="comma list of trained head folders (or 'shipped') to measure "
                        "on the held-out sets instead of training")
    args = parser.parse_args()
    out = check_output_dir(parser, args.output_dir)
    model, _ = dk.load_model()
    samples, heldout = load(Path(args.data))
    if args.heads:
        heads = measure_heads(model, args.heads.split(","), heldout)
        lines = ["| head | sha256 | generated tokens | steps | " + " | ".join(f"{n} d1..d5 (mean acc.)" for n in heldout)
                 + " |", "|---" * 6 + "|"]
        lines += [f"| {h['head']} | {h['sha256']} | {h['tokens']} | {h['steps']} | " + " | ".join(" / ".join(f"{x:.2f}" for x in h[n]["acceptance_by_depth"])
                  + f" ({h[n]['mean_accepted']:.2f})" for n in heldout) + " |" for h in heads]
        lines += ["", "Depth 1, P(the target's token is among the head's k likeliest drafts):", "",
                  "| head | set | " + " | ".join(f"top-{k}" for k in TOPK) + " |", "|---" * (2 + len(TOPK)) + "|"]
        lines += [f"| {h['head']} | {n} | " + " | ".join(f"{t:.2f}" for t in h[n]["depth1_topk"].values()) + " |"
                  for h in heads for n in heldout]
        write_report(out, "EAGLE heads on the held-out sets", lines, dict(args=vars(args), heads=heads))
        return
    results = [run(model, name, subset, heldout, steps, args)
               for name, subset, steps in subsets(samples, args.runs.split(","), args.steps)]
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "curves.png")
    lines = table(results) + ["", "![learning curves](curves.png)"]
    write_report(out, "EAGLE head learning curves", lines, dict(args=vars(args), runs=results))


if __name__ == "__main__":
    main()
