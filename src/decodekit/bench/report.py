"""The benchmark's outputs: summary rows, ``report.md``, ``results.json`` and PNG plots.

Everything here works on the plain ``results`` dict that ``decodekit bench`` builds (and
that ``results.json`` holds), so a report can be re-made from a saved JSON file:
``decodekit.bench.report.write_outputs(json.load(open("results.json")), out_dir)``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from decodekit.bench.card import card_items

__all__ = ["summarize", "write_outputs", "render_report", "write_plots"]


# ---------------------------------------------------------------------------- summaries
def _median(values):
    return statistics.median(values) if values else None


def _rates(trials: list[dict]) -> list[float]:
    return [t["tokens"] / t["seconds"] for t in trials if t["seconds"] > 0]


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(results: dict) -> list[dict]:
    """One row per run: tokens/s (median, min, max), ratios to our greedy, to the
    transformers equivalent and to the floor, forwards per token, acceptance, memory,
    identity with greedy, quality."""
    runs = results["runs"]
    median = {}
    for r in runs:
        median[(r["strategy"], r["impl"], r["dtype"], r["batch_size"], r["gamma"])] = _median(_rates(r["trials"]))
    decode = {(r["strategy"], r["impl"], r["dtype"], r["batch_size"], r["gamma"]): _decode_ms(r["trials"])
              for r in runs}
    rows = []
    for r in runs:
        rates = _rates(r["trials"])
        med = _median(rates)
        where = (r["dtype"], r["batch_size"], None)
        greedy = median.get(("greedy", "decodekit", *where))
        hf = median.get((r["strategy"], "transformers", *where)) if r["impl"] == "decodekit" else None
        floor = median.get(("floor", "floor", *where))
        spec = r.get("spec") or {}
        steps = spec.get("verify_steps", 0)
        row = {
            "key": r["key"], "strategy": r["strategy"], "impl": r["impl"], "dtype": r["dtype"],
            "batch_size": r["batch_size"], "gamma": r["gamma"] if r["gamma"] is not None else
            (r.get("options") or {}).get("gamma"), "swept": r["gamma"] is not None,
            "tokens_per_s": med, "tokens_per_s_min": min(rates) if rates else None,
            "tokens_per_s_max": max(rates) if rates else None, "trials": len(rates),
            "x_greedy": _ratio(med, greedy), "x_transformers": _ratio(med, hf),
            "ms_per_token": 1000 / med if med else None,
            "x_floor_ms": _ratio(floor, med),  # (our ms/token) / (floor ms/token) = floor tok/s / ours
            # after each row's first token: the decode rate without the prefill, fair between
            # strategies whose outputs differ in length (prefill time spread over fewer tokens)
            "decode_ms_per_token": decode[(r["strategy"], r["impl"], *where[:2], r["gamma"])],
            "decode_x_greedy": _ratio(decode.get(("greedy", "decodekit", *where)),
                                      decode[(r["strategy"], r["impl"], *where[:2], r["gamma"])]),
            "forwards_per_token": _ratio(spec.get("forwards"), spec.get("tokens_per_row")),
            "acceptance_rate": _ratio(spec.get("accepted"), spec.get("drafted")) if spec.get("drafted") else None,
            "mean_accepted_length": (spec.get("accepted", 0) + steps) / steps if steps else None,
            "histogram": spec.get("histogram"),
            "peak_rss_mib": r.get("peak_rss_mib"),
            "identical_to_greedy": r.get("identical_to_greedy"),
            "identical_to_transformers": r.get("identical_to_transformers"),
            "quality": r.get("quality") or {},
            "suites": {s: _median([t["suites"][s]["tokens"] / t["suites"][s]["seconds"]
                                   for t in r["trials"] if s in t["suites"] and t["suites"][s]["seconds"] > 0])
                       for s in results.get("prompts", {})},
            "error": r.get("error"),
        }
        rows.append(row)
    return rows


def _decode_ms(trials: list[dict]) -> float | None:
    """Median over trials of ms per token after the first token of each row (None without)."""
    return _median([1000 * t["decode_seconds"] / t["decode_tokens"] for t in trials if t.get("decode_tokens")])


def foundation_rows(summary: list[dict]) -> list[dict]:
    """Issue 2's table: our greedy vs transformers' greedy vs the bare floor."""
    by = {(r["strategy"], r["impl"], r["dtype"], r["batch_size"]): r for r in summary if not r["swept"]}
    out = []
    cells = sorted({(r["dtype"], r["batch_size"]) for r in summary if r["strategy"] == "greedy"})
    for dtype, bs in cells:
        ours = by.get(("greedy", "decodekit", dtype, bs), {}).get("tokens_per_s")
        hf = by.get(("greedy", "transformers", dtype, bs), {}).get("tokens_per_s")
        floor = by.get(("floor", "floor", dtype, bs), {}).get("tokens_per_s")
        b1 = by.get(("greedy", "decodekit", dtype, min(b for d, b in cells if d == dtype)), {}).get("tokens_per_s")
        out.append({"dtype": dtype, "batch_size": bs, "ours": ours, "transformers": hf, "floor": floor,
                    "ours_vs_transformers": _ratio(ours, hf), "ours_vs_floor": _ratio(ours, floor),
                    "batch_scaling": _ratio(ours, b1)})
    return out


# ---------------------------------------------------------------------------- markdown
def _f(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_report(results: dict) -> str:
    summary = results.get("summary") or summarize(results)
    cfg = results["config"]
    lines = ["# decodekit bench", ""]
    if results.get("command"):
        lines += ["```", results["command"], "```", ""]
    if not results.get("completed", True):
        lines += ["**Interrupted**: the tables hold the trials measured before Ctrl-C.", ""]
    lines += [f"- {label}: {text}" for label, text in card_items(results["card"])]
    prompts = ", ".join(f"{s} {n}" for s, n in results.get("prompts", {}).items())
    lines += [
        f"- prompts: {prompts} (chat template), max_new_tokens {cfg['max_new_tokens']}, "
        f"{cfg['trials']} interleaved trials, " + ("EOS ignored (fixed length)" if cfg["ignore_eos"]
                                                   else "rows stop at EOS")
        + (", timed in process CPU seconds (--clock cpu)" if cfg.get("clock") == "cpu" else ""),
        f"- wall time: {results.get('wall_seconds', 0):.0f} s", "",
        "tokens/s = new tokens / seconds over every prompt (median of the trials, "
        "min–max in brackets). x greedy / x transformers: tokens/s ratio to our greedy / to "
        "transformers' equivalent call (same dtype and batch). decode ms/token: after each row's "
        "first token, so without the prefill (fair where outputs differ in length); decode x greedy: "
        "our greedy's over this run's. x floor: how many times the "
        "bare forward loop's ms/token this run's ms/token is. fwd/token: target-model "
        "forward calls per generated token of a row. = greedy / = transformers rows: rows "
        "token-identical to our greedy / to transformers' equivalent.", "",
    ]
    lines += _foundation_section(summary)
    lines += _peer_section(summary)
    lines += _main_section(summary)
    lines += _suite_section(summary, results)
    lines += _quality_section(summary)
    lines += _sweep_section(summary)
    errors = [r for r in summary if r["error"]]
    if errors:
        lines += ["## Runs that failed", ""]
        lines += [f"- `{r['key']}`: {r['error']}" for r in errors] + [""]
    lines += ["Plots: `tokens_per_s.png`, `acceptance_histogram.png`, `speedup_vs_gamma.png`.", ""]
    return "\n".join(lines)


def _foundation_section(summary: list[dict]) -> list[str]:
    rows = foundation_rows(summary)
    if not rows:
        return []
    body = [[r["dtype"], str(r["batch_size"]), _f(r["ours"]), _f(r["transformers"]), _f(r["floor"]),
             _f(r["ours_vs_transformers"], 2), _f(r["ours_vs_floor"], 2), _f(r["batch_scaling"], 2)]
            for r in rows]
    lines = ["## Greedy: decodekit vs transformers vs the bare forward loop", ""]
    lines += _table(["dtype", "batch", "decodekit tok/s", "transformers tok/s", "floor tok/s",
                     "ours / transformers", "ours / floor", "vs smallest batch"], body)
    b1 = {r["dtype"]: r["ours"] for r in rows if r["batch_size"] == min(x["batch_size"] for x in rows)}
    if len(b1) > 1 and all(v for v in b1.values()):
        best = max(b1, key=b1.get)
        lines += ["", f"Fastest dtype for greedy decoding at the smallest batch: **{best}**."]
    return lines + [""]


def _peer_section(summary: list[dict]) -> list[str]:
    """``--peers llama.cpp``: our greedy at every dtype (llama.cpp = decodekit on the llama.cpp
    backend) against llama.cpp's own greedy, at each batch size (llama.cpp runs rows one by one)."""
    by = {(r["strategy"], r["impl"], r["dtype"], r["batch_size"]): r["tokens_per_s"]
          for r in summary if not r["swept"]}
    peer = {bs: rate for (name, impl, _, bs), rate in by.items() if name == "greedy" and impl == "llama.cpp"}
    if not peer:
        return []
    cells = next(r["dtype"] for r in summary if r["impl"] == "llama.cpp")
    body = []
    for (name, impl, dtype, bs), rate in sorted(by.items(), key=lambda kv: (kv[0][3], kv[0][2])):
        if name == "greedy" and impl == "decodekit" and bs in peer:
            body.append([dtype, str(bs), _f(rate), _f(peer[bs]), _f(_ratio(rate, peer[bs]), 2)])
    lines = ["## Greedy: decodekit vs llama.cpp's own (same GGUF, same prompts)", ""]
    lines += _table(["decodekit dtype", "batch", "decodekit tok/s", "llama.cpp tok/s", "ours / llama.cpp"], body)
    return lines + ["", "llama.cpp decodes a batch's rows one after another (its `generate` runs one "
                        f"sequence) on the GGUF of the `{cells}` cells below, where its prompt lookup row is.", ""]


def _main_section(summary: list[dict]) -> list[str]:
    lines = []
    cells = sorted({(r["dtype"], r["batch_size"]) for r in summary if not r["swept"]})
    for dtype, bs in cells:
        rows = [r for r in summary if (r["dtype"], r["batch_size"]) == (dtype, bs) and not r["swept"]]
        body = []
        for r in rows:
            body.append([
                r["strategy"], r["impl"],
                f"{_f(r['tokens_per_s'])} ({_f(r['tokens_per_s_min'])}–{_f(r['tokens_per_s_max'])})",
                _f(r["x_greedy"], 2), _f(r["x_transformers"], 2), _f(r["ms_per_token"]),
                _f(r["decode_ms_per_token"]), _f(r["decode_x_greedy"], 2),
                _f(r["x_floor_ms"], 2), _f(r["forwards_per_token"], 2), _f(r["acceptance_rate"], 2),
                _f(r["mean_accepted_length"], 2), _f(r["peak_rss_mib"], 0),
                r["identical_to_greedy"] or "–", r["identical_to_transformers"] or "–",
            ])
        lines += [f"## {dtype}, batch {bs}", ""]
        lines += _table(["strategy", "impl", "tok/s (min–max)", "x greedy", "x transformers",
                         "ms/token", "decode ms/token", "decode x greedy", "x floor", "fwd/token", "acceptance", "mean acc. len",
                         "peak RSS MiB", "= greedy rows", "= transformers rows"], body)
        lines.append("")
    return lines


def _suite_section(summary: list[dict], results: dict) -> list[str]:
    suites = list(results.get("prompts", {}))
    if len(suites) < 2:
        return []
    rows = [r for r in summary if not r["swept"] and r["impl"] != "floor"]
    if not rows:
        return []
    bs, dtype = min(r["batch_size"] for r in rows), rows[0]["dtype"]
    rows = [r for r in rows if (r["batch_size"], r["dtype"]) == (bs, dtype)]
    body = [[r["strategy"], r["impl"]] + [_f(r["suites"].get(s)) for s in suites] for r in rows]
    return [f"## Tokens/s per suite ({dtype}, batch {bs})", ""] + \
        _table(["strategy", "impl"] + suites, body) + [""]


def _quality_section(summary: list[dict]) -> list[str]:
    rows = [r for r in summary if r["quality"]]
    if not rows:
        return []
    body = [[r["strategy"], r["impl"], _f(r["quality"].get("loglik_per_token"), 3),
             _f(r["quality"].get("distinct_2"), 3),
             _f(100 * r["quality"]["exact_match"], 0, "%") if r["quality"].get("exact_match") is not None else "–"]
            for r in rows]
    return ["## Quality (smallest batch)", "",
            "log-lik/token: mean log p(continuation) per token under the model (temperature 1); "
            "distinct-2: distinct bigrams / bigrams; exact match: qa suite answers containing a "
            "gold answer.", ""] + _table(["strategy", "impl", "log-lik/token", "distinct-2",
                                          "exact match (qa)"], body) + [""]


def sweep_rows(summary: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Strategy -> [(gamma, x greedy)] for the drafting strategies at the sweep's cell."""
    swept = [r for r in summary if r["swept"]]
    if not swept:
        return {}
    dtype, bs = swept[0]["dtype"], swept[0]["batch_size"]
    out: dict[str, list[tuple[int, float]]] = {}
    for r in summary:
        if r["impl"] == "decodekit" and r["gamma"] is not None and (r["dtype"], r["batch_size"]) == (dtype, bs) \
                and r["x_greedy"] is not None:
            out.setdefault(r["strategy"], []).append((r["gamma"], r["x_greedy"]))
    return {k: sorted(v) for k, v in out.items()}


def _sweep_section(summary: list[dict]) -> list[str]:
    sweep = sweep_rows(summary)
    if not sweep:
        return []
    gammas = sorted({g for pts in sweep.values() for g, _ in pts})
    body = [[name] + [_f(dict(pts).get(g), 2) for g in gammas] for name, pts in sweep.items()]
    return ["## Speed-up over greedy vs draft length (gamma)", ""] + \
        _table(["strategy"] + [f"gamma={g}" for g in gammas], body) + [""]


# ---------------------------------------------------------------------------- plots
def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """tokens_per_s.png, acceptance_histogram.png, speedup_vs_gamma.png (when there is data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("summary") or summarize(results)
    paths = []
    for name, draw in (("tokens_per_s.png", _plot_tokens_per_s), ("acceptance_histogram.png", _plot_histogram),
                       ("speedup_vs_gamma.png", _plot_sweep)):
        fig = draw(plt, summary, results)
        if fig is None:
            continue
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_tokens_per_s(plt, summary, results):
    rows = [r for r in summary if not r["swept"] and r["tokens_per_s"]]
    if not rows:
        return None
    cells = sorted({(r["dtype"], r["batch_size"]) for r in rows})
    impls = ["decodekit", "transformers", "floor", "llama.cpp"]
    colors = {"decodekit": "tab:blue", "transformers": "tab:orange", "floor": "tab:gray", "llama.cpp": "tab:green"}
    n_names = len({r["strategy"] for r in rows})
    fig, axes = plt.subplots(len(cells), 1, figsize=(max(10, 1.2 * n_names), 3.8 * len(cells)), squeeze=False)
    unit = "CPU-second" if results.get("config", {}).get("clock") == "cpu" else "s"
    for ax, (dtype, bs) in zip(axes[:, 0], cells, strict=False):
        cell = [r for r in rows if (r["dtype"], r["batch_size"]) == (dtype, bs)]
        names = list(dict.fromkeys(r["strategy"] for r in cell))
        width = 0.8 / 2
        labelled = set()
        for x, name in enumerate(names):
            group = [r for impl in impls for r in cell if r["strategy"] == name and r["impl"] == impl]
            for i, r in enumerate(group):
                y = r["tokens_per_s"]
                err = [[y - (r["tokens_per_s_min"] or y)], [(r["tokens_per_s_max"] or y) - y]]
                impl = r["impl"]
                label = None if impl in labelled else ("bare forward loop (floor)" if impl == "floor" else impl)
                labelled.add(impl)
                ax.bar(x + (i - (len(group) - 1) / 2) * width, y, width, yerr=err, capsize=3,
                       color=colors[impl], label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right")
        ax.set_ylabel(f"tokens / {unit} (median, min–max)")
        ax.set_title(f"Decoding throughput, {dtype}, batch {bs}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("strategy")
    fig.tight_layout()
    return fig


def _plot_histogram(plt, summary, results):
    rows = [r for r in summary if r["histogram"] and not r["swept"]]
    if not rows:
        return None
    bs = min(r["batch_size"] for r in rows)
    dtype = rows[0]["dtype"]
    rows = [r for r in rows if (r["batch_size"], r["dtype"]) == (bs, dtype)]
    width_max = max(int(k) for r in rows for k in r["histogram"]) + 1
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        hist = {int(k): v for k, v in r["histogram"].items()}
        total = sum(hist.values())
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(width_max)]
        gamma = f"gamma {r['gamma']}, " if r["gamma"] is not None else ""
        ax.bar(xs, [hist.get(j, 0) / total for j in range(width_max)], width,
               label=f"{r['strategy']} ({gamma}mean {_f(r['mean_accepted_length'], 2)} tokens/step)")
    ax.set_xticks(range(width_max))
    ax.set_xlabel("drafts accepted in one verify step")
    ax.set_ylabel("share of verify steps")
    ax.set_title(f"Acceptance histogram ({dtype}, batch {bs})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_sweep(plt, summary, results):
    sweep = sweep_rows(summary)
    if not any(len(pts) > 1 for pts in sweep.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in sweep.items():
        ax.plot([g for g, _ in pts], [s for _, s in pts], marker="o", label=name)
    ax.axhline(1.0, color="gray", linestyle="--", label="greedy (1.0x)")
    ax.set_xticks(sorted({g for pts in sweep.values() for g, _ in pts}))
    ax.set_xlabel("draft length gamma (tokens per verify step)")
    ax.set_ylabel("speed-up over our greedy (x, tokens/s ratio)")
    swept = next(r for r in summary if r["swept"])
    ax.set_title(f"Speed-up vs draft length ({swept['dtype']}, batch {swept['batch_size']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------- files
def write_outputs(results: dict, out_dir: Path | str) -> list[Path]:
    """Write results.json, report.md and the plots into ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "summary" not in results:
        results["summary"] = summarize(results)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    report_path = out_dir / "report.md"
    report_path.write_text(render_report(results), encoding="utf-8")
    return [report_path, json_path, *write_plots(results, out_dir)]
