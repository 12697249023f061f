"""Iterative block refinement (the seed's ``iterative_generate``) and Jacobi decoding.

Both fill a *block* of ``n`` future positions in parallel. The block starts as ``n``
placeholder tokens (EOS, as in the seed). One *pass* feeds the committed sequence's last
token followed by the block's current guesses and takes the argmax at every position (the
next-token shift: the logits at position ``i`` predict position ``i + 1``), which gives a
new iterate of the whole block::

    fed:       x_last  g_1  g_2 ... g_{n-1}          (g_n is never fed: nothing reads it)
    iterate:   y_1     y_2  y_3 ... y_n              y_i = argmax p(. | x, g_<i)

``y_1`` is always the greedy token. If the guess ``g_i`` equals the new ``y_i`` it was
already right, so ``y_{i+1}`` was computed from a correct context too: after each pass the
leading ``accepted + 1`` positions (``accepted`` = leading guesses confirmed, counted by the
shared ``verify``) have *converged* and never change again. They are committed to the KV
cache and only the open tail of the block is fed on the next pass.

* **Jacobi decoding** (``strategy="jacobi"``, ``refine_iter="converge"``): iterate each
  block until all its positions have converged. Token-identical to greedy decoding; each
  pass commits at least one token, so a block takes at most ``n`` passes.
* **Seed refinement** (``strategy="refine"``, ``refine_iter=r``): block of
  ``add_eos_length + 1`` positions, at most ``r`` passes; after pass ``r`` the block's
  iterate is taken as it stands, converged or not. That is the seed's update rule (pass 1
  writes ``add_eos_length`` predictions over the placeholders and appends the last one,
  later passes overwrite the block; the prefix never changes) - committing converged
  positions early only skips work whose result is known. It is meant for models trained to
  fill blocks; on a plain causal LM it is LOSSY: positions that had not converged after
  ``r`` passes are guesses made from a wrong context (``debug[row]["unconverged_tokens"]``
  counts them).

The prompt's KV cache is computed once (by the first pass); each pass re-runs only the
block's open positions. Rows of a batch move independently (ragged rows are right-aligned,
so every row's block window ends at the last column); a row that reaches EOS, its token
budget or ``max_length`` leaves the batch and the others continue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from decodekit.cache import ModelState
from decodekit.strategies.base import DecodeRequest, drop_finished
from decodekit.strategies.options import Options, option, parse_int_or
from decodekit.strategies.verify import verify
from decodekit.validation import DecodeKitError, check_int

__all__ = ["RefineOptions", "JacobiOptions", "decode_refine", "decode_jacobi", "format_refine_trace"]

log = logging.getLogger(__name__)

CONVERGE = "converge"


# ---------------------------------------------------------------------------- per-row state
@dataclass
class _RowBlock:
    """One row's decoding state: committed tokens not yet cached, and its current block."""

    row: int  # the caller's row number
    left: int  # tokens this row may still emit (max_new_tokens, max_length)
    pending: list[int]  # committed tokens not in the KV cache yet (>= 1; the prompt at first)
    emitted: int = 0  # tokens committed so far
    block: int = -1  # index of the current block
    committed: list[int] = field(default_factory=list)  # the block's committed positions
    guesses: list[int] = field(default_factory=list)  # current iterate of its open positions
    passes: int = 0  # passes spent on the current block
    iterations: list[int] = field(default_factory=list)  # passes each block took
    unconverged: int = 0  # tokens committed without having converged (lossy refine)
    trace: list[dict] = field(default_factory=list)  # debug: one entry per pass

    def start_block(self, block_size: int, placeholder: int) -> None:
        self.block += 1
        size = min(block_size, self.left)  # never guess past the row's budget
        self.committed, self.guesses, self.passes = [], [placeholder] * size, 0

    def close(self) -> None:
        if self.passes:
            self.iterations.append(self.passes)
            self.passes = 0

    def debug_record(self, with_trace: bool) -> dict:
        record = {"block_iterations": self.iterations, "unconverged_tokens": self.unconverged}
        if with_trace:
            record["passes"] = self.trace
        return record


# ---------------------------------------------------------------------------- one pass
def _pass_inputs(rows: list[_RowBlock], filler: int) -> Tensor:
    """``[B, W]``: each row's pending tokens + open guesses (the last guess is never fed),
    left-aligned and filled up to ``W`` with ``filler`` tokens. The fillers are real
    tokens (mask 1) after everything that matters, rolled back after the pass: no row has
    a masked gap, which sliding-window attention would count as context."""
    fed = [r.pending + r.guesses[:-1] for r in rows]
    width = max(len(f) for f in fed)
    return torch.tensor([f + [filler] * (width - len(f)) for f in fed], dtype=torch.long)


def _block_window(logits: Tensor, start: Tensor) -> Tensor:
    """``logits [B, K, V]`` of the last ``K`` fed columns -> ``[B, K, V]`` starting at row
    ``b``'s first block position ``start[b]`` (an index into the kept columns)."""
    width = logits.shape[1]
    j = torch.arange(width, device=logits.device)
    idx = (start[:, None] + j[None, :]).clamp(max=width - 1)  # [B, K]
    return logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))


def _guess_tensor(rows: list[_RowBlock], width: int, device) -> Tensor:
    """``[B, width]`` the fed guesses (the drafts being checked), padded with -1."""
    out = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        fed = r.guesses[:-1]
        if fed:
            out[b, : len(fed)] = torch.tensor(fed, dtype=torch.long, device=device)
    return out


def _refine_pass(req: DecodeRequest, state: ModelState, rows: list[_RowBlock],
                 filler: int) -> tuple[Tensor, Tensor, int, Tensor]:
    """Run one pass; returns the new iterates ``[B, M]`` (row ``b``'s open positions first),
    ``accepted [B]`` (the leading fed guesses the model confirmed), the columns fed and the
    processed scores ``[B, M, V]`` the iterates were taken from. Block
    position ``j`` is processed with the history ending in guesses ``0..j-1`` (exact under
    history processors such as repetition_penalty)."""
    ids = _pass_inputs(rows, filler)  # [B, W]
    fed = ids.shape[1]
    device = state.ids.device
    open_ = torch.tensor([len(r.guesses) for r in rows], device=device)  # [B] block positions
    first = torch.tensor([len(r.pending) - 1 for r in rows], device=device)  # [B] their first column
    keep = fed - int(first.min())  # logits of the columns from the earliest block start on
    logits = state.extend(ids, logits_to_keep=keep)  # [B, K, V]
    window = _block_window(logits, first - (fed - keep))[:, : int(open_.max())]  # [B, M, V]
    drafts = _guess_tensor(rows, window.shape[1] - 1, device)  # [B, M-1]
    histories = None
    if req.processor.needs_history:
        histories = [h + d for h, d in zip(req.histories(), drafts.clamp_min(0).tolist())]
    scores = req.scores(window, histories)  # [B, M, V]
    p = req.processor.distribution(scores)  # one-hot (greedy)
    result = verify(p, drafts, open_ - 1, greedy=True)
    return p.argmax(dim=-1), result.accepted, fed, scores


def _advance(r: _RowBlock, iterate: list[int], accepted: int, max_iterations: int | None,
             debug: bool) -> tuple[list[int], int]:
    """Commit what converged (everything, once the pass budget is spent); returns the
    committed tokens and how many of the fed columns the row's KV cache keeps."""
    r.passes += 1
    forced = max_iterations is not None and r.passes >= max_iterations
    n_open = len(iterate)
    n_commit = n_open if forced else accepted + 1  # the token after the confirmed guesses is exact
    if debug:
        changed = [len(r.committed) + j for j in range(n_open) if iterate[j] != r.guesses[j]]
        r.trace.append({"block": r.block, "pass": r.passes, "start": r.emitted - len(r.committed),
                        "changed": changed, "converged": len(r.committed) + accepted + 1,
                        "iterate": r.committed + iterate})
    new = iterate[:n_commit]
    # The cache got pending + fed guesses (+ fillers); keep pending + the confirmed guesses.
    # Committed tokens past them were computed from a stale context: re-fed as pending.
    keep = len(r.pending) + accepted
    r.pending = iterate[accepted:n_commit]
    r.committed += new
    r.guesses = iterate[n_commit:]
    r.emitted += n_commit
    r.left -= n_commit
    return new, keep


# ---------------------------------------------------------------------------- the loop
def _start_rows(req: DecodeRequest, block_size: int, placeholder: int, max_length: int | None) -> list[_RowBlock]:
    """One ``_RowBlock`` per prompt, its whole prompt pending and its first block opened."""
    rows = []
    for b, prompt in enumerate(req.prompt_rows()):
        left = req.max_new_tokens if max_length is None else min(req.max_new_tokens, max_length - len(prompt))
        rows.append(_RowBlock(row=b, left=left, pending=prompt))
        rows[-1].start_block(block_size, placeholder)
    return rows


def _advance_rows(req: DecodeRequest, rows: list[_RowBlock], iterate: Tensor, accepted: Tensor, fed: int,
                  max_iterations: int | None, block_size: int, placeholder: int):
    """Step 2 for every row: commit what converged, open the next block of rows whose block
    is full. Returns the committed tokens, the fed columns each row's cache forgets and the
    exact (converged) tokens among the committed ones, per row."""
    new_tokens, forget, exact_tokens = [], [], []
    for b, r in enumerate(rows):
        n_open = len(r.guesses)
        new, keep = _advance(r, iterate[b, :n_open].tolist(), int(accepted[b]), max_iterations, req.debug)
        new_tokens.append(new)
        forget.append(fed - keep)
        exact_tokens.append(int(accepted[b]) + 1)  # the leading ones, computed from a correct context
        if not r.guesses:
            r.close()
            r.start_block(block_size, placeholder)
    return new_tokens, forget, exact_tokens


def _emit(req: DecodeRequest, rows: list[_RowBlock], new_tokens, exact_tokens, finished_rows: dict,
          scores: Tensor) -> list[bool]:
    """Step 3: committed tokens to the tracker (each row's from the start of its window of
    ``scores``); returns which rows finished (their debug record goes to ``finished_rows``)."""
    tracker = req.tracker
    before = [len(tracker.tokens[r.row]) for r in rows]
    finished = [f or r.left <= 0 for f, r in zip(tracker.push(new_tokens, scores), rows)]
    for r, n_before, n_exact in zip(rows, before, exact_tokens):
        r.unconverged += max(0, len(tracker.tokens[r.row]) - n_before - n_exact)  # kept ones only
    for r, f in zip(rows, finished):
        if f:
            r.close()
            finished_rows[r.row] = r.debug_record(req.debug)
    return finished


def _decode_blocks(req: DecodeRequest, block_size: int, max_iterations: int | None,
                   max_length: int | None = None):
    """Block refinement with ``block_size`` positions, at most ``max_iterations`` passes a
    block (None: until converged, i.e. Jacobi decoding). Returns ``GenerationOutput``.

    One pass: 1. run the blocks, 2. commit what converged, roll the cache back to it,
    3. emit, 4. drop finished rows and compact holes."""
    if not req.processor.is_greedy:
        raise DecodeKitError("refine/jacobi decoding is greedy only: drop temperature/top_k/top_p")
    tracker = req.tracker
    placeholder = req.eos_token_ids[0] if req.eos_token_ids else req.pad_token_id
    rows = _start_rows(req, block_size, placeholder, max_length)
    n_rows = len(rows)
    # Nothing is cached yet: the first pass runs the prompt and the first block together.
    state = ModelState.empty(req.model, n_rows, use_cache=req.use_cache)
    finished_rows: dict[int, dict] = {}
    while not tracker.done:
        iterate, accepted, fed, scores = _refine_pass(req, state, rows, req.pad_token_id)  # 1
        if max_iterations is None:  # exact: acceptance stats count the confirmed guesses
            tracker.record_verify([len(r.guesses) - 1 for r in rows], accepted.tolist())
        new_tokens, forget, exact_tokens = _advance_rows(req, rows, iterate, accepted, fed, max_iterations,
                                                         block_size, placeholder)  # 2
        state.rollback(torch.tensor(forget))
        finished = _emit(req, rows, new_tokens, exact_tokens, finished_rows, scores)  # 3
        rows = [r for r, f in zip(rows, finished) if not f]  # 4
        drop_finished(tracker, finished, [state])
        if not tracker.done:
            state.compact_holes(block_size)  # ragged rows leave holes
    return tracker.result(debug=[finished_rows[b] for b in range(n_rows)])


# ---------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class RefineOptions(Options):
    """Options of strategy ``"refine"`` (the seed's names)."""

    add_eos_length: int = option(127, "EOS placeholders per block; a block is add_eos_length + 1 tokens",
                                 int, min=1)
    refine_iter: int | str = option(2, "refine passes per block (>= 1), or converge (Jacobi = greedy)",
                                    "any", parse=parse_int_or(CONVERGE))
    max_length: int = option(8192, "most tokens per row, prompt included", int, min=2)

    def validate(self) -> None:
        if self.refine_iter == CONVERGE:
            return
        if isinstance(self.refine_iter, str):
            raise DecodeKitError(
                f"refine_iter must be an integer >= 1 or {CONVERGE!r}, got {self.refine_iter!r}")
        check_int("refine_iter", self.refine_iter, min_value=1)

    @property
    def max_iterations(self) -> int | None:
        """Passes per block (None: until converged)."""
        return None if self.refine_iter == CONVERGE else self.refine_iter


@dataclass(frozen=True)
class JacobiOptions(Options):
    """Options of strategy ``"jacobi"``."""

    block_size: int = option(16, "tokens guessed per block", int, min=1)
    max_iterations: int | None = option(None, "most passes per block (then the block is kept as "
                                        "is: LOSSY)", int, min=1, optional=True)


def decode_refine(req: DecodeRequest, opts: RefineOptions):
    """The seed's iterative block refinement, greedy: blocks of ``add_eos_length + 1``
    tokens, each refined by ``refine_iter`` passes (``"converge"``: until it stops changing,
    which is Jacobi decoding). Rows stop at EOS, ``max_new_tokens`` or at ``max_length``
    tokens in all (prompt included).

    LOSSY on a plain causal LM when ``refine_iter`` is a number: tokens that had not
    converged after ``refine_iter`` passes are kept as they are (the seed's design, for
    models trained to fill blocks). ``debug[row]`` holds ``block_iterations`` (passes per
    block) and ``unconverged_tokens``; with ``debug=True`` also ``passes``: per pass, the
    block positions that changed (see ``format_refine_trace``).
    """
    longest = int(req.attention_mask.sum(-1).max())
    if longest >= opts.max_length:
        raise DecodeKitError(
            f"prompt is {longest} tokens, at or over max_length={opts.max_length}: raise max_length "
            "or shorten the prompt"
        )
    return _decode_blocks(req, opts.add_eos_length + 1, opts.max_iterations, opts.max_length)


def decode_jacobi(req: DecodeRequest, opts: JacobiOptions):
    """Jacobi decoding: guess ``block_size`` tokens, refine them in parallel until they reach
    the fixed point, committing every leading position that has converged after each pass.

    Token-identical to greedy decoding (``max_iterations=None``). Stats: ``forward_passes``
    and ``tokens_per_forward``; acceptance stats count the confirmed guesses; ``debug[row]
    ["block_iterations"]`` holds the passes each block took. ``max_iterations`` caps the
    passes per block and keeps an unconverged block as it stands: lossy, like ``refine``.
    On a model not trained for it expect about 1.0-1.1 tokens per forward: every pass costs
    a block-wide forward, so it is usually slower than greedy.
    """
    return _decode_blocks(req, opts.block_size, opts.max_iterations)


# ---------------------------------------------------------------------------- debug view
def format_refine_trace(debug: list[dict], tokenizer=None) -> str:
    """Text view of ``GenerationOutput.debug`` of refine/jacobi: per row and pass, the block
    positions that changed (``[...]`` marks a changed token) and how many have converged."""
    lines = []
    for row, record in enumerate(debug):
        iters = record.get("block_iterations", [])
        lines.append(f"row {row}: {len(iters)} block(s), passes per block {iters}, "
                     f"unconverged tokens kept {record.get('unconverged_tokens', 0)}")
        for step in record.get("passes", []):
            changed = set(step["changed"])
            if tokenizer is None:
                shown = " ".join(f"[{t}]" if i in changed else str(t) for i, t in enumerate(step["iterate"]))
            else:
                pieces = [tokenizer.decode([t]) for t in step["iterate"]]
                shown = "".join(f"[{p}]" if i in changed else p for i, p in enumerate(pieces))
            lines.append(f"  block {step['block']} pass {step['pass']}: {len(changed)} changed, "
                         f"{step['converged']}/{len(step['iterate'])} converged | {shown!r}")
    return "\n".join(lines)
