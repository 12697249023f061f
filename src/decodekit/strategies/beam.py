"""Beam search, batched: the beams of every prompt are rows of one batch.

The prompts are prefilled once (one row each). Every step then works like this:

1. **expand** – each running beam's next-token log-probs are added to its running
   score (sum of log-probs, starting at 0); per prompt, the best
   ``max(2, 1 + #eos) * num_beams`` expansions are the *candidates*;
2. **finish** – candidates among the best ``num_beams`` that end (EOS, the
   ``max_new_tokens`` limit, a stop string) become finished *hypotheses*, scored with the
   length penalty; each prompt keeps its best ``num_beams`` hypotheses;
3. **continue** – the best ``num_beams`` candidates that did not end are the next
   running beams: the KV-cache rows are reordered by their source beam
   (``ModelState.select_rows``), so the prefix is never run again;
4. **stop** – a prompt is done when no running beam can beat its hypotheses any more
   (``early_stopping``, below); its rows leave the batch.

Length penalty (``L`` = generated tokens, EOS included):

* ``length_style="hf"`` (transformers): ``score = sum log p / L ** length_penalty``;
* ``length_style="gnmt"`` (the seed API): ``sum log p / ((m + L) / (m + 1)) ** length_penalty``
  with ``m = gnmt_min_length`` (a constant, not a minimum output length).

``early_stopping`` has transformers 5.x's meaning: ``True`` stops a prompt as soon as it
has ``num_beams`` hypotheses; ``False`` also stops it when the best running beam, scored
at its current length, cannot beat the worst hypothesis; ``"never"`` does the same but,
for a positive penalty, scores the running beam at ``max_new_tokens`` (the best it could
ever get), which is the canonical (exhaustive) beam search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from decodekit.cache import ModelState, left_pad
from decodekit.processors import top_k_filtering
from decodekit.strategies.base import DecodeRequest
from decodekit.strategies.options import Options, option, parse_bool_or
from decodekit.validation import DecodeKitError, check_float, check_int

__all__ = ["BeamOptions", "decode", "format_beam_trace", "LengthPenalty"]

log = logging.getLogger(__name__)

LENGTH_STYLES = ("hf", "gnmt")
NOT_A_HYPOTHESIS = -1.0e9  # transformers' score of an empty hypothesis slot


# ---------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class LengthPenalty:
    """``normalizer(L)``: what a hypothesis' sum of log-probs is divided by."""

    style: str = "hf"
    alpha: float = 1.0  # the length_penalty exponent
    min_length: float = 5.0  # GNMT constant

    def __call__(self, length: int) -> float:
        if self.style == "gnmt":
            return ((self.min_length + length) / (self.min_length + 1)) ** self.alpha
        return length**self.alpha


@dataclass
class Hypotheses:
    """Finished hypotheses of one prompt: the best ``num_beams`` ``(score, tokens)``, best first."""

    num_beams: int
    items: list[tuple[float, list[int]]] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.num_beams

    @property
    def worst(self) -> float:
        """Score a new hypothesis must beat (an empty slot counts as ``NOT_A_HYPOTHESIS``)."""
        return self.items[-1][0] if self.full else NOT_A_HYPOTHESIS

    def add(self, score: float, tokens: list[int]) -> None:
        if score <= self.worst:
            return
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.num_beams :]


@dataclass
class Candidates:
    """The best expansions of each live prompt (``n`` prompts, ``c`` candidates each)."""

    scores: Tensor  # [n, c] running score + log p(token)
    rows: Tensor  # [n, c] batch row of the beam that was expanded
    tokens: Tensor  # [n, c, L+1] generated tokens, the new one last


# ---------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class BeamOptions(Options):
    """Options of strategy ``"beam"`` (transformers' names where they overlap)."""

    num_beams: int = option(4, "beams kept per prompt", int, min=1)
    length_penalty: float = option(1.0, "exponent of the length normalisation", float)
    early_stopping: bool | str = option(False, "true | false | never, as in transformers", "any",
                                        parse=parse_bool_or("never"))
    num_return_sequences: int = option(1, "sequences returned per prompt (<= num_beams)", int, min=1)
    length_style: str = option("hf", "hf: logp / L**penalty; gnmt: GNMT length penalty", str,
                               choices=LENGTH_STYLES)
    gnmt_min_length: float = option(5.0, "the GNMT penalty's constant m", float, min=0.0)
    expansion_top_k: int | None = option(None, "keep each beam's top-k expansions", int, min=1,
                                         optional=True)

    def validate(self) -> None:
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise DecodeKitError(f"early_stopping must be True, False or 'never'; got {self.early_stopping!r}")
        check_int("num_return_sequences", self.num_return_sequences, max_value=self.num_beams)
        if self.length_style == "gnmt":
            check_float("length_penalty", self.length_penalty, min_value=0.0)  # GNMT alpha

    def penalty(self) -> LengthPenalty:
        return LengthPenalty(self.length_style, float(self.length_penalty), float(self.gnmt_min_length))


# ---------------------------------------------------------------------------- one step
def expansion_log_probs(req: DecodeRequest, logits: Tensor, top_k: int | None,
                        prompts: list[list[int]] | None = None, tokens: Tensor | None = None) -> Tensor:
    """``[R, V]`` logits -> log-probs of every expansion ``[R, V]`` (-inf where excluded).

    A sampling processor (temperature, top-k/top-p) reshapes the distribution the beams
    are scored with; ``top_k`` keeps only each beam's ``top_k`` best tokens. History
    processors (penalties...) see each beam's sequence, ``prompts[r]`` + ``tokens [R, L]``,
    and, as in transformers' beam search, process the log-softmax of the logits.
    """
    proc = req.processor
    if proc.needs_history:
        ids, mask = left_pad([p + t for p, t in zip(prompts, tokens.tolist())], req.pad_token_id)  # [R, T]
        pads = (mask == 0).sum(-1)  # [R]
        starts = pads + torch.tensor([len(p) for p in prompts])  # [R] where generation begins
        scores = proc.process_logits(ids.to(logits.device), torch.log_softmax(logits.float(), dim=-1),
                                     starts, pads)
        log_probs = scores if proc.is_greedy else torch.log_softmax(scores, dim=-1)
    elif proc.is_greedy:  # history-free steps (suppress_tokens, logit_bias) still apply
        log_probs = proc.process_logits(None, torch.log_softmax(logits.float(), dim=-1))
    else:
        log_probs = torch.log(proc(logits))
    return log_probs if top_k is None else top_k_filtering(log_probs, top_k)


def top_candidates(log_probs: Tensor, scores: Tensor, tokens: Tensor, width: int) -> Candidates:
    """Best ``width`` expansions per prompt over all its beams.

    ``log_probs [n*b, V]``, ``scores [n, b]`` running scores, ``tokens [n*b, L]``.
    """
    n, beams = scores.shape
    vocab = log_probs.shape[-1]
    total = (log_probs.view(n, beams, vocab) + scores[:, :, None]).view(n, beams * vocab)
    best, flat = torch.topk(total, min(width, beams * vocab), dim=-1)  # [n, c]
    rows = flat // vocab + beams * torch.arange(n, device=flat.device)[:, None]  # [n, c]
    new = flat % vocab  # [n, c]
    prefix = tokens.index_select(0, rows.flatten()).view(n, rows.shape[1], -1)  # [n, c, L]
    return Candidates(best, rows, torch.cat([prefix, new[:, :, None]], dim=-1))


def ends_hypothesis(req: DecodeRequest, cand: Candidates) -> Tensor:
    """``[n, c]``: the candidate ends here (EOS, length limit or stop string)."""
    new = cand.tokens[:, :, -1]
    ended = torch.zeros_like(new, dtype=torch.bool)
    for eos in req.eos_token_ids:
        ended |= new == eos
    if cand.tokens.shape[-1] >= req.max_new_tokens:
        ended[:] = True
    if req.tracker.stop_strings:
        hits = [req.tracker.hits_stop_string(seq) for seq in cand.tokens.flatten(0, 1).tolist()]
        ended |= torch.tensor(hits, device=ended.device).view_as(ended)
    return ended


def collect_hypotheses(hyps: list[Hypotheses], cand: Candidates, ended: Tensor, num_beams: int,
                       normalizer: float) -> list[list[tuple[float, list[int]]]]:
    """Candidates among the best ``num_beams`` that ended become hypotheses of their prompt.

    Returns, per live prompt, the new ``(score, tokens)`` (for the debug trace).
    """
    scores = cand.scores[:, :num_beams] / normalizer  # [n, k] float32, like transformers
    ended = ended[:, :num_beams] & torch.isfinite(scores)
    new: list[list[tuple[float, list[int]]]] = [[] for _ in hyps]
    for i, j in ended.nonzero().tolist():
        item = (float(scores[i, j]), cand.tokens[i, j].tolist())
        hyps[i].add(*item)
        new[i].append(item)
    return new


def next_beams(cand: Candidates, ended: Tensor, num_beams: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best ``num_beams`` candidates that did not end: ``scores [n, k]``, ``rows [n, k]``,
    ``tokens [n*k, L+1]``."""
    running = cand.scores + ended.float() * NOT_A_HYPOTHESIS  # [n, c]
    scores, pick = torch.topk(running, num_beams, dim=-1)  # [n, k]
    rows = cand.rows.gather(1, pick)
    tokens = cand.tokens.gather(1, pick[:, :, None].expand(-1, -1, cand.tokens.shape[-1]))
    return scores, rows, tokens.flatten(0, 1)


def prompts_done(hyps: list[Hypotheses], best_running: Tensor, length: int, penalty: LengthPenalty,
                 early_stopping, max_new_tokens: int) -> list[bool]:
    """Per live prompt: can no running beam improve its hypotheses any more?

    ``best_running [n]`` is the best running score, ``length`` the running beams' length.
    """
    if early_stopping == "never" and penalty.alpha > 0.0:
        length = max_new_tokens  # a positive penalty favours the longest possible beam
    best_possible = best_running / penalty(length)  # [n] float32
    done = []
    for h, best in zip(hyps, best_possible.tolist()):
        full_stop = h.full and early_stopping is True
        done.append(full_stop or not best > h.worst)
    return done


# ---------------------------------------------------------------------------- the loop
@torch.inference_mode()
def decode(req: DecodeRequest, opts: BeamOptions):
    """Beam search over a batch of prompts; returns ``num_return_sequences`` sequences per
    prompt (prompt-major) with their scores, and one ``RequestStats`` per prompt."""
    penalty, num_beams, early_stopping = opts.penalty(), opts.num_beams, opts.early_stopping
    history = req.processor.needs_history
    prompts = req.prompt_rows() if history else None
    tracker = req.tracker
    width = max(2, 1 + len(req.eos_token_ids)) * num_beams
    state, logits = ModelState.prefill(req.model, req.input_ids, req.attention_mask, use_cache=req.use_cache)
    n_prompts = req.input_ids.shape[0]
    device = logits.device
    hyps = [Hypotheses(num_beams) for _ in range(n_prompts)]
    live = list(range(n_prompts))  # prompts in the batch, in batch order
    scores = torch.zeros(n_prompts, 1, device=device)  # [n, b]: one beam per prompt to start
    tokens = torch.zeros(n_prompts, 0, dtype=torch.long, device=device)  # [n*b, L]
    trace = [] if req.debug else None

    for step in range(req.max_new_tokens):
        tracker.count_forwards(state, rows=live)  # the last forward: every live prompt's beams
        beams = tokens.shape[0] // len(live)
        beam_prompts = [prompts[live[r // beams]] for r in range(tokens.shape[0])] if history else None
        log_probs = expansion_log_probs(req, logits[:, -1], opts.expansion_top_k, beam_prompts, tokens)
        cand = top_candidates(log_probs, scores, tokens, width)
        ended = ends_hypothesis(req, cand)
        live_hyps = [hyps[p] for p in live]
        finished = collect_hypotheses(live_hyps, cand, ended, num_beams, penalty(step + 1))
        scores, rows, tokens = next_beams(cand, ended, num_beams)
        done = prompts_done(live_hyps, scores[:, 0], step + 1, penalty, early_stopping, req.max_new_tokens)
        if trace is not None:
            trace.append(_trace_step(step, live, scores, tokens, finished, req.tokenizer))
        if step + 1 == req.max_new_tokens or all(done):
            break
        keep = torch.tensor([not d for d in done], device=device)
        live = [p for p, d in zip(live, done) if not d]
        scores, rows = scores[keep], rows[keep]
        tokens = tokens.view(len(done), num_beams, -1)[keep].flatten(0, 1)
        state.select_rows(rows.flatten())  # reorder the KV cache by source beam
        logits = state.extend(tokens[:, -1:])  # [n*k, 1, V]
    return _result(req, hyps, opts.num_return_sequences, trace)


def _result(req: DecodeRequest, hyps: list[Hypotheses], num_return_sequences: int, trace):
    """Best hypotheses per prompt -> GenerationOutput (the best one streams and fills stats)."""
    picked = [h.items[:num_return_sequences] for h in hyps]
    for items in picked:  # only when every expansion was excluded (expansion_top_k)
        items += [(float("-inf"), [])] * (num_return_sequences - len(items))
    req.tracker.push([items[0][1] for items in picked])
    out = req.tracker.result(scores=[s for items in picked for s, _ in items], debug=trace)
    return replace(out, sequences=[seq for items in picked for _, seq in items])


# ---------------------------------------------------------------------------- debug view
def _beam_view(tokens: list[int], score: float, tokenizer) -> dict:
    text = tokenizer.decode(tokens, skip_special_tokens=False) if tokenizer is not None else None
    return {"tokens": tokens, "score": score, "text": text}


def _trace_step(step, live, scores, tokens, finished, tokenizer) -> dict:
    """Live beams (running score = sum of log-probs) and new hypotheses of every prompt."""
    k = scores.shape[1]
    rows = tokens.tolist()
    prompts = []
    for i, p in enumerate(live):
        beams = [_beam_view(rows[i * k + j], float(scores[i, j]), tokenizer)
                 for j in range(k) if scores[i, j] > NOT_A_HYPOTHESIS / 2]
        done = [_beam_view(seq, score, tokenizer) for score, seq in finished[i]]
        prompts.append({"prompt": p, "beams": beams, "finished": done})
    return {"step": step, "prompts": prompts}


def format_beam_trace(trace: list[dict], tokenizer=None) -> str:
    """Readable step-by-step view of ``GenerationOutput.debug`` from beam search."""
    lines = []
    for entry in trace:
        for prompt in entry["prompts"]:
            lines.append(f"step {entry['step'] + 1}  prompt {prompt['prompt']}")
            for rank, beam in enumerate(prompt["beams"], 1):
                lines.append(f"  beam {rank}  logp {beam['score']:9.4f}  {_shown(beam, tokenizer)}")
            for hyp in prompt["finished"]:
                lines.append(f"  done    score {hyp['score']:9.4f}  {_shown(hyp, tokenizer)}")
    return "\n".join(lines)


def _shown(beam: dict, tokenizer) -> str:
    text = beam.get("text")
    if text is None and tokenizer is not None:
        text = tokenizer.decode(beam["tokens"], skip_special_tokens=False)
    return repr(text) if text is not None else str(beam["tokens"])

