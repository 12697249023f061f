"""Seeing speculation work: the generated text with accepted drafts and target tokens marked.

A draft trace (``GenerationOutput.debug`` of the speculative strategies with
``show_drafts=True``) is, per row, a list of ``(token_id, kind)``:

* ``"draft"``     a drafted token the target accepted,
* ``"recovered"`` the target's token after it rejected a draft (a correction),
* ``"bonus"``     the target's extra token after it accepted every draft,
* ``"target"``    a target token with no draft to check (the first token, zero drafts).

``render_drafts`` shows accepted drafts in green and target-corrected tokens in red
(bonus/target tokens in the default colour); without colour, accepted draft runs are in
``[brackets]`` and corrections in ``{braces}``.
"""

from __future__ import annotations

import sys

from decodekit.detok import IncrementalDetokenizer

__all__ = ["render_drafts", "draft_legend", "format_draft_trace"]

_ANSI = {"draft": "\033[32m", "recovered": "\033[1;31m"}
_RESET = "\033[0m"
_PLAIN = {"draft": ("[", "]"), "recovered": ("{", "}")}


def _token_texts(tokenizer, tokens: list[int]) -> list[str]:
    """Text added by each token: a character split over several tokens belongs to the token
    that completes it, so the pieces joined are exactly the decoded text (no repeats)."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    texts = [detok.push([token]) for token in tokens]
    if texts:
        texts[-1] += detok.flush()
    return texts


def _render_row(tokenizer, trace, color: bool) -> str:
    texts = _token_texts(tokenizer, [int(t) for t, _ in trace])
    out, run_kind, run = [], None, []

    def flush():
        text = "".join(run)
        if run_kind in _ANSI and text:
            if color:
                out.append(f"{_ANSI[run_kind]}{text}{_RESET}")
            else:
                left, right = _PLAIN[run_kind]
                out.append(f"{left}{text}{right}")
        else:
            out.append(text)

    for (_, kind), text in zip(trace, texts):
        kind = kind if kind in _ANSI else "plain"
        if kind != run_kind or kind == "recovered":
            flush()
            run_kind, run = kind, []
        run.append(text)
    flush()
    return "".join(out)


def draft_legend(color: bool = True) -> str:
    if color:
        return (f"legend: {_ANSI['draft']}accepted draft{_RESET}  "
                f"{_ANSI['recovered']}target correction{_RESET}  target/bonus token")
    return "legend: [accepted drafts]  {target correction}  target/bonus tokens unmarked"


def render_drafts(tokenizer, trace, color: bool | None = None) -> str:
    """Text of a draft trace with accepted drafts and target corrections distinguished.

    ``trace``: one row's ``[(token, kind), ...]`` or a list of rows (the whole
    ``GenerationOutput.debug``); rows are rendered one per paragraph after a legend.
    ``color``: ANSI colours (default: when stdout is a terminal); False -> brackets.
    The arguments may also come as ``(trace, tokenizer)``, the CLI's formatter order.
    """
    if hasattr(trace, "decode") and not hasattr(tokenizer, "decode"):
        tokenizer, trace = trace, tokenizer
    if color is None:
        color = sys.stdout.isatty()
    trace = list(trace or [])
    rows = [trace] if trace and isinstance(trace[0], tuple) else trace
    rendered = [_render_row(tokenizer, row, color) for row in rows if row is not None]
    if len(rows) == 1 and rows is not trace:
        return rendered[0]
    return "\n\n".join([draft_legend(color)] + [f"[{i}] {text}" for i, text in enumerate(rendered)])


def format_draft_trace(debug, tokenizer=None) -> str:
    """Trace formatter of the drafting strategies (``Strategy.format_trace``): every row's
    text with accepted drafts and target tokens distinguished."""
    return render_drafts(tokenizer, debug)
