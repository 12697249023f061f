"""Structured output: JSON Schema, JSON, regular expressions, grammars and choice lists.

A constraint is one more history processor (``GrammarConstraint``): for every row it masks
the tokens the grammar forbids (logit -inf) at the next position, and allows EOS only where
the grammar is complete. It reads the row's generated tokens from ``input_ids`` /
``prompt_lengths`` like the penalties do, so the strategies need nothing new to stay exact:

* speculation calls it on ``[B, K, V]`` logits, position ``j`` with the history that ends in
  drafts ``0..j-1``: draft ``j`` is judged by the masked target distribution (a draft the
  grammar forbids has probability 0 and is rejected), and the next step's shorter history
  rolls the matcher back to the accepted prefix;
* beam search passes every beam's own sequence: a beam's matcher is the closest earlier
  matcher (longest common prefix), copied when two beams share a parent.

The engine is llguidance (``benchmarks/constraint_engines.py``: ~15 us a mask on the bundled
49k tokenizer, rollback and cheap copies, Lark / GBNF / regex / JSON Schema, a small wheel).
``ConstraintSpec.from_options`` checks a spec without a tokenizer or model, so bad input
fails before anything loads.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from decodekit.processors import HistoryProcessor
from decodekit.validation import DecodeKitError

__all__ = ["CONSTRAINT_OPTIONS", "ConstraintSpec", "GrammarConstraint", "pop_constraint", "forced_tokens",
           "constraint_stats", "load_prompt_schemas", "add_constraint_flags", "constraint_args", "RowConstraints"]

# generate()'s constraint keywords; at most one may be given.
CONSTRAINT_OPTIONS = ("json_schema", "json_object", "regex", "grammar", "choices")
_JSON_DEFAULTS = {"whitespace_flexible": False}  # compact JSON: no runs of spaces or newlines


def _engine():
    try:
        import llguidance
    except ImportError as exc:  # a core dependency; only a broken install gets here
        raise DecodeKitError("structured output needs the llguidance package: pip install llguidance") from exc
    return llguidance


def _schema(value) -> dict | bool:
    """A JSON Schema given as a dict, a JSON string, or a path to a JSON file."""
    if isinstance(value, dict | bool):
        return value
    if not isinstance(value, str):
        raise DecodeKitError(f"json_schema must be a dict or a JSON string, got {type(value).__name__}")
    text = value
    if not value.lstrip().startswith(("{", "[")) and os.path.isfile(value):
        text = Path(value).read_text()
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeKitError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise DecodeKitError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    return schema


def _choices(value) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise DecodeKitError(f"choices must be a non-empty list of strings, got {value!r}")
    if not all(isinstance(c, str) and c for c in value):
        raise DecodeKitError(f"choices must hold non-empty strings, got {value!r}")
    return list(value)


def _grammar_text(name: str, value) -> str:
    """The llguidance grammar (a JSON string) for one constraint keyword."""
    llg = _engine()
    build = llg.LLMatcher
    try:
        if name == "json_schema":
            return build.grammar_from_json_schema(_schema(value), defaults=_JSON_DEFAULTS)
        if name == "json_object":
            return build.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
        if name == "regex":
            return build.grammar_from_regex(value)
        if name == "choices":
            return build.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in _choices(value)))
        text = Path(value).read_text() if os.path.isfile(value) else value
        return llg.grammar_from("grammar", text)  # Lark, or GBNF (llama.cpp) converted to Lark
    except (ValueError, TypeError) as exc:
        raise DecodeKitError(f"{name} is invalid: {_one_line(str(exc))}") from None


def _one_line(message: str) -> str:
    """The engine's message on one line, without its caret and source-echo lines."""
    lines = [line.strip() for line in message.strip().splitlines()]
    return " ".join(ln for ln in lines if ln and set(ln) != {"^"} and not re.match(r"^\d+ \|", ln))


@dataclass(frozen=True)
class ConstraintSpec:
    """One checked constraint: ``name`` (the keyword it came from) and the engine's grammar."""

    name: str
    grammar: str

    @classmethod
    def from_options(cls, **given) -> ConstraintSpec | None:
        """The spec of generate's constraint keywords (None or False: not given); a bad one
        raises a one-line ``DecodeKitError`` naming it, with the engine's message."""
        given = {k: v for k, v in given.items() if v is not None and v is not False}
        unknown = set(given) - set(CONSTRAINT_OPTIONS)
        if unknown:
            raise TypeError(f"unknown constraint options: {sorted(unknown)}")
        if not given:
            return None
        if len(given) > 1:
            raise DecodeKitError(f"give one constraint, not {' and '.join(sorted(given))}")
        (name, value), = given.items()
        if name == "json_object" and value is not True:
            raise DecodeKitError(f"json_object must be True or False, got {value!r}")
        if name in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise DecodeKitError(f"{name} must be a non-empty string, got {value!r}")
        grammar = _grammar_text(name, value)
        error = _engine().LLMatcher.validate_grammar(grammar)
        if error:
            raise DecodeKitError(f"{name} is invalid: {_one_line(error)}")
        return cls(name, grammar)


def _per_prompt(name: str, value) -> bool:
    """A list of per-prompt values (``json_schema=[schema, None]``) rather than one value (a
    choice list holds strings; a per-prompt one holds lists or None)."""
    if not isinstance(value, list | tuple):
        return False
    return name != "choices" or any(v is None or isinstance(v, list | tuple) for v in value)


def pop_constraint(options: dict) -> ConstraintSpec | list[ConstraintSpec | None] | None:
    """Remove the constraint keywords from ``options``; return their checked spec, or one spec
    (None: unconstrained) per prompt when they are given as per-prompt lists."""
    given = {k: options.pop(k) for k in CONSTRAINT_OPTIONS if k in options}
    lists = {k: v for k, v in given.items() if v is not None and v is not False and _per_prompt(k, v)}
    if not lists:
        return ConstraintSpec.from_options(**given)
    single = [k for k, v in given.items() if k not in lists and v is not None and v is not False]
    lengths = {len(v) for v in lists.values()}
    if single or len(lengths) > 1:
        raise DecodeKitError(f"per-prompt constraints: give {', '.join(sorted(given))} as lists of one "
                             "entry per prompt (None: unconstrained)")
    specs = []
    for i in range(lengths.pop()):
        try:
            specs.append(ConstraintSpec.from_options(**{k: v[i] for k, v in lists.items()}))
        except DecodeKitError as exc:
            raise DecodeKitError(f"prompt {i}: {exc}") from None
    return specs


_TOKENIZERS: dict = {}  # (id(tokenizer), vocab) -> (tokenizer, LLTokenizer): ~0.3 s to build


def _ll_tokenizer(tokenizer, vocab: int):
    key = (id(tokenizer), vocab)
    if key not in _TOKENIZERS:
        import llguidance.hf

        try:
            _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab))
        except ValueError as exc:
            raise DecodeKitError(f"structured output needs a fast (Rust) Hugging Face tokenizer: {exc}") from None
    return _TOKENIZERS[key][1]


# bit j of byte value v, [256, 8]: unpacks llguidance's little-endian 32-bit mask words
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


class _Row:
    """One row's matcher and the generated tokens it has consumed."""

    __slots__ = ("matcher", "tokens", "ok")

    def __init__(self, matcher, tokens: list[int]):
        self.matcher, self.tokens, self.ok = matcher, tokens, True

    def copy(self) -> _Row:
        return _Row(self.matcher.deep_copy(), list(self.tokens))

    def sync(self, generated: list[int]) -> None:
        """Roll back to the common prefix with ``generated``, then consume the rest. ``ok`` is
        False when a token is not allowed (an unconstrained draft): later positions are moot."""
        common = _common_prefix(self.tokens, generated)
        if common < len(self.tokens):
            self.matcher.rollback(len(self.tokens) - common)
            del self.tokens[common:]
        rest = generated[common:]
        taken = self.matcher.try_consume_tokens(rest) if rest else 0
        self.tokens += rest[:taken]
        self.ok = taken == len(rest) and not self.matcher.is_error()


NEAR = 16  # tokens of rollback + replay under which an earlier row's matcher is taken at once


def _claim(old: list[_Row], generated: list[list[int]], fresh) -> list[_Row]:
    """Each row's matcher, synced with its generated tokens. A matcher's state depends only on
    its tokens, so any earlier row will do; the cost is the rollback and replay between them.
    Rows keep their order when others leave, so the search goes forward from the last pick
    (linear in the batch); a row with no near match takes the closest (copied if taken)."""
    taken, rows, start = set(), [], 0
    for tokens in generated:
        pick = next((i for i in range(start, len(old))
                     if i not in taken and _distance(old[i].tokens, tokens) <= NEAR), None)
        if pick is None:
            pick = min(range(len(old)), key=lambda i: _distance(old[i].tokens, tokens), default=None)
        if pick is None:
            row = _Row(fresh(), [])
        elif pick in taken:
            row = old[pick].copy()
        else:
            row, start = old[pick], pick + 1
            taken.add(pick)
        row.sync(tokens)
        rows.append(row)
    return rows


def _distance(a: list[int], b: list[int]) -> int:
    """Tokens to roll back from ``a`` and replay to reach ``b``."""
    if abs(len(a) - len(b)) > NEAR:
        return abs(len(a) - len(b)) + 2 * min(len(a), len(b))  # far: no need to compare
    common = _common_prefix(a, b)
    return len(a) + len(b) - 2 * common


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


class GrammarConstraint(HistoryProcessor):
    """Mask what ``spec`` forbids at each row's next position (see the module docstring).

    ``mask_seconds`` adds up the time spent computing masks."""

    def __init__(self, spec: ConstraintSpec, tokenizer, eos_token_id, vocab_size: int):
        if tokenizer is None:
            raise DecodeKitError(f"{spec.name} needs tokenizer=... (the grammar is matched on token text)")
        self.spec, self.tokenizer = spec, tokenizer
        self.eos = torch.tensor(sorted(set(eos_token_id or [])), dtype=torch.long)
        self.vocab = int(vocab_size)
        self._root = _engine().LLMatcher(_ll_tokenizer(tokenizer, self.vocab), spec.grammar, log_level=0)
        if self._root.is_error():
            raise DecodeKitError(f"{spec.name} is invalid: {_one_line(self._root.get_error())}")
        self._rows: list[_Row] = []  # the rows of the last call (the pipeline's)
        self._draft_rows: list[_Row] = []  # the rows of the last ``forced`` call (a drafter's)
        self.mask_seconds = 0.0

    def __repr__(self) -> str:
        return f"GrammarConstraint({self.spec.name})"

    def fresh_matcher(self):
        return self._root.deep_copy()

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        if prompt_lengths is None:
            raise DecodeKitError(f"{self.spec.name} needs the prompt lengths (prompt_lengths)")
        start = time.perf_counter()
        bsz = logits.shape[0]
        starts = prompt_lengths.tolist() if isinstance(prompt_lengths, Tensor) else [int(prompt_lengths)] * bsz
        history = input_ids.tolist()
        rows = _claim(self._rows, [history[b][starts[b]:] for b in range(bsz)], self.fresh_matcher)
        allowed = self._allowed(rows, logits.shape[-1])  # [B, V]
        self._rows = rows
        self.mask_seconds += time.perf_counter() - start
        return logits.masked_fill(~allowed.to(logits.device), -float("inf"))

    def forced(self, generated: list[list[int]], k: int) -> list[list[int]]:
        """Per row (its generated tokens): the next up to ``k`` tokens the grammar forces, one
        allowed token at a time, EOS excluded (drafts the masked target always accepts)."""
        self._draft_rows = _claim(self._draft_rows, generated, self.fresh_matcher)
        eos = set(self.eos.tolist())
        out = []
        for row in self._draft_rows:
            tokens = []
            while row.ok and len(tokens) < k:
                bits = int.from_bytes(row.matcher.compute_bitmask(), "little")
                if bits.bit_count() != 1 or bits.bit_length() - 1 in eos:
                    break
                tokens.append(bits.bit_length() - 1)
                row.sync(row.tokens + tokens[-1:])
            out.append(tokens)
        return out

    def _allowed(self, rows: list[_Row], vocab: int) -> Tensor:
        """``[B, V]`` bool: the tokens each row may take next (every token for a row whose
        history the grammar already refused: that position is never used)."""
        words = (vocab + 31) // 32
        bits = torch.full((len(rows), words), -1, dtype=torch.int32)  # [B, W] all allowed
        for b, row in enumerate(rows):
            if row.ok:
                mask = torch.frombuffer(bytearray(row.matcher.compute_bitmask()), dtype=torch.int32)
                bits[b, : min(words, mask.numel())] = mask[:words]
                bits[b, mask.numel():] = 0
        allowed = _BYTE_BITS[bits.view(torch.uint8).long()].reshape(len(rows), -1)[:, :vocab]  # [B, V]
        eos = self.eos[self.eos < vocab]
        if eos.numel():
            done = torch.tensor([(not r.ok) or r.matcher.is_accepting() for r in rows])  # [B]
            allowed[:, eos] = done[:, None]
        return allowed


class RowConstraints(HistoryProcessor):
    """Each row its own ``GrammarConstraint`` (or None: unconstrained), following the batch
    as rows finish (``select_rows``). Rows with the same constraint are masked together."""

    def __init__(self, constraints: list[GrammarConstraint | None]):
        self.constraints = list(constraints)  # per active row
        self.initial = list(constraints)  # per row of the request, for the stats

    def __repr__(self) -> str:
        return f"RowConstraints({len(self.constraints)} rows)"

    def select_rows(self, keep: list[int]) -> None:
        self.constraints = [self.constraints[i] for i in keep]

    def __call__(self, input_ids, logits, prompt_lengths=None, pad_lengths=None):
        if len(self.constraints) != logits.shape[0]:
            raise DecodeKitError(f"per-prompt constraints follow {len(self.constraints)} rows, got {logits.shape[0]}")
        out = logits
        for constraint in {id(c): c for c in self.constraints if c is not None}.values():
            rows = torch.tensor([b for b, c in enumerate(self.constraints) if c is constraint])  # [n]
            starts = prompt_lengths.index_select(0, rows.to(prompt_lengths.device))
            masked = constraint(input_ids.index_select(0, rows.to(input_ids.device)),
                                logits.index_select(0, rows.to(logits.device)), starts)  # [n, V]
            out = out.index_copy(0, rows.to(logits.device), masked)
        return out


def forced_tokens(spec: ConstraintSpec, tokenizer, vocab: int, tokens: list[int]) -> int:
    """How many of ``tokens`` the grammar forced: positions where it allowed one token only
    (replayed on a fresh matcher: ~15 us a token)."""
    matcher = _engine().LLMatcher(_ll_tokenizer(tokenizer, vocab), spec.grammar, log_level=0)
    count = 0
    for token in tokens:
        count += int.from_bytes(matcher.compute_bitmask(), "little").bit_count() == 1
        if not matcher.consume_token(token):
            break
    return count


def load_prompt_schemas(prompts_file: str | None) -> list | None:
    """Per prompt of a .json / .jsonl prompts file, its object's ``"json_schema"`` (None where it
    has none); None when no prompt has one. Each is checked (a bad one names its prompt)."""
    if not prompts_file or Path(prompts_file).suffix.lower() not in (".json", ".jsonl"):
        return None
    try:
        text = Path(prompts_file).read_text(encoding="utf-8")
        if prompts_file.lower().endswith(".jsonl"):
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # load_prompts names the file or the bad line
    schemas = [e.get("json_schema") if isinstance(e, dict) else None for e in entries]
    for i, schema in enumerate(schemas):
        if schema is not None:
            try:
                ConstraintSpec.from_options(json_schema=schema)
            except DecodeKitError as exc:
                raise DecodeKitError(f"prompts_file prompt {i}: {exc}") from None
    return schemas if any(s is not None for s in schemas) else None


def add_constraint_flags(parser) -> None:
    """``decodekit generate``'s structured-output flags (one of them at most)."""
    from decodekit.flags import add_flag

    group = parser.add_argument_group("structured output (one of)")
    add_flag(group, "json_schema", default=None, help="JSON Schema the output must follow: a file or JSON text")
    add_flag(group, "json_object", action="store_true", default=None, help="the output is one JSON object")
    add_flag(group, "regex", default=None, help="regular expression the whole output must match")
    add_flag(group, "grammar", default=None, help="Lark or GBNF grammar (a file or the text) the output follows")
    add_flag(group, "choices", action="append", default=None, help="the output is one of these (repeat the flag)")


def constraint_args(args, strategy) -> dict:
    """The constraint flags of ``args`` as generate's keywords, checked with everything they
    meet (``strategy``: the ``Strategy`` record; the prompts file's schemas; the engine)."""
    given = {k: getattr(args, k) for k in CONSTRAINT_OPTIONS if getattr(args, k, None) is not None}
    spec = ConstraintSpec.from_options(**given)
    if spec is not None and not strategy.constrained:
        raise DecodeKitError(f"strategy {strategy.name!r} does not take --{spec.name}")
    for knob in ("min_new_tokens", "ignore_eos"):
        if spec is not None and getattr(args, knob, None):
            raise DecodeKitError(f"--{knob} cannot be combined with --{spec.name}: the grammar decides where "
                                 "the output ends")
    if load_prompt_schemas(getattr(args, "prompts_file", None)) is not None:
        if not strategy.constrained:
            raise DecodeKitError(f"strategy {strategy.name!r} does not take the prompts' json_schema")
        if getattr(args, "engine", None) not in (None, "local"):
            raise DecodeKitError("per-prompt json_schema runs with --engine local only")
    return given


def constraint_stats(processor, sequences: list[list[int]], stats: list) -> None:
    """Fill ``mask_seconds`` (the call's mask time, shared evenly by its rows) and
    ``forced_tokens`` of each row's ``RequestStats`` when ``processor`` holds a constraint."""
    steps = getattr(processor, "processors", [])
    per_row = [p for p in steps if isinstance(p, RowConstraints)]
    shared = [p for p in steps if isinstance(p, GrammarConstraint)]
    rows = per_row[0].initial if per_row else shared[:1] * len(stats)
    for seq, stat, constraint in zip(sequences, stats, rows):
        if constraint is not None:
            users = sum(c is constraint for c in rows)
            stat.mask_seconds = constraint.mask_seconds / max(1, users)
            stat.forced_tokens = forced_tokens(constraint.spec, constraint.tokenizer, constraint.vocab, seq)
