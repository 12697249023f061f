"""Prompts in, results out: the one implementation every command uses.

* ``load_prompts`` reads ``--prompt`` or ``--prompts_file`` (.txt one prompt a line, .json a
  list, .jsonl objects with a "prompt" field) and names the line of any bad entry.
* ``encode_prompts`` applies the chat template (or not) and tokenizes.
* ``ResultWriter`` appends each finished batch to the output file at once (.jsonl, or a
  .json list rewritten atomically), and with ``resume`` skips prompts already written, so
  an interrupted run loses nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from decodekit.validation import DecodeKitError

__all__ = ["load_prompts", "encode_prompts", "iter_batches", "ResultWriter", "make_record"]


def _prompt_from(entry, where: str) -> str:
    if isinstance(entry, dict):
        if "prompt" not in entry:
            raise DecodeKitError(f"prompts_file {where}: object has no \"prompt\" field")
        entry = entry["prompt"]
    if not isinstance(entry, str):
        raise DecodeKitError(f"prompts_file {where}: a prompt must be a string, got {type(entry).__name__}")
    if not entry.strip():
        raise DecodeKitError(f"prompts_file {where}: empty prompt")
    return entry


def load_prompts(prompt: str | None = None, prompts_file: str | None = None) -> list[str]:
    """Exactly one of ``prompt`` / ``prompts_file``; returns the prompts in order."""
    if (prompt is None) == (prompts_file is None):
        raise DecodeKitError("give exactly one of --prompt or --prompts_file")
    if prompt is not None:
        if not prompt.strip():
            raise DecodeKitError("prompt is empty: give some text")
        return [prompt]
    path = Path(prompts_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DecodeKitError(f"prompts_file {prompts_file!r} cannot be read: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DecodeKitError(f"prompts_file {path.name}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, list):
            raise DecodeKitError(f"prompts_file {path.name}: a .json file must hold a list of prompts")
        prompts = [_prompt_from(e, f"item {i}") for i, e in enumerate(data)]
    elif suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DecodeKitError(f"prompts_file {path.name} line {n}: invalid JSON ({exc.msg})") from None
            prompts.append(_prompt_from(entry, f"line {n}"))
    elif suffix in (".txt", ""):
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        raise DecodeKitError(f"prompts_file must end in .txt, .json or .jsonl, got {path.name!r}")
    if not prompts:
        raise DecodeKitError(f"prompts_file {path.name} holds no prompts")
    return prompts


def encode_prompts(tokenizer, prompts: Sequence[str], use_chat_template: bool,
                   allow_special_tokens: bool = False) -> list[list[int]]:
    """Token ids per prompt, through the chat template when asked (and when there is one).

    A prompt is tokenized as text: special-token text typed in it (``<|im_end|>``) stays
    text, so a prompt cannot close its turn and forge another. ``allow_special_tokens=True``
    tokenizes it the old way, special-token text becoming the special tokens.
    """
    chat = use_chat_template and getattr(tokenizer, "chat_template", None)
    rows = []
    for text in prompts:
        if chat and allow_special_tokens:
            ids = tokenizer.apply_chat_template(_user_turn(text), add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        elif chat:
            ids = _encode_chat_turn(tokenizer, text)
        else:
            ids = tokenizer(text, add_special_tokens=True, split_special_tokens=not allow_special_tokens)["input_ids"]
        rows.append(list(ids))
    return rows


_PLACEHOLDER = "DecodekitPromptPlaceholder"


def _user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _encode_chat_turn(tokenizer, text: str) -> list[int]:
    """The chat template's ids with the user's text tokenized as text.

    The template is rendered twice, with the text and with a placeholder, to find where the
    text lands. Tokenizers split text at special tokens before anything else, so the ids are
    those of: the template up to its last special token before the text (special tokens
    recognised), the text with the template's plain text around it (special tokens split),
    and the template from its first special token after the text: for a prompt without
    special-token text, exactly ``apply_chat_template(..., tokenize=True)``.
    """
    def render(content: str) -> str:
        return tokenizer.apply_chat_template(_user_turn(content), add_generation_prompt=True, tokenize=False)

    rendered = render(text)
    before, found, after = render(_PLACEHOLDER).partition(_PLACEHOLDER)
    start, end = len(before), len(rendered) - len(after)
    if not found or _PLACEHOLDER in after or start > end or not (
            rendered.startswith(before) and rendered.endswith(after)):
        raise DecodeKitError("use_chat_template: cannot locate the prompt in the chat template's text; "
                             "use --allow_special_tokens to tokenize the templated text as is")
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]
    head = max((before.rfind(s) + len(s) for s in specials if s in before), default=0)
    tail = min((end + after.find(s) for s in specials if s in after), default=len(rendered))

    def encode(part: str, split: bool) -> list[int]:
        return tokenizer(part, add_special_tokens=False, split_special_tokens=split)["input_ids"] if part else []

    return (encode(rendered[:head], False) + encode(rendered[head:tail], True)
            + encode(rendered[tail:], False))


def iter_batches(items: Sequence, batch_size: int) -> Iterator[list]:
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def make_record(prompt: str, prompt_ids: Sequence[int], response_ids: Sequence[int], tokenizer,
                stats: dict | None = None, prompt_text: str | None = None) -> dict:
    """One result with the seed's fields (+ token ids and stats)."""
    response = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    shown_prompt = prompt_text if prompt_text is not None else tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    record = {
        "prompt": prompt,
        "response": response,
        "full_text": shown_prompt + tokenizer.decode(list(response_ids), skip_special_tokens=False),
        "prompt_length": len(prompt_ids),
        "response_length": len(response_ids),
        "total_length": len(prompt_ids) + len(response_ids),
        "response_token_ids": list(map(int, response_ids)),
    }
    if stats is not None:
        record["stats"] = stats
    return record


class ResultWriter:
    """Writes results batch by batch; ``.json`` files are rewritten atomically, others are
    JSON Lines appended and flushed. ``done`` holds the prompts already present (resume)."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        self.as_json = self.path.suffix.lower() == ".json"
        if self.path.is_dir():
            raise DecodeKitError(f"output_file {str(self.path)!r} is a directory")
        self.records: list[dict] = []
        if resume and self.path.exists():
            self.records = self._read_existing()
            if not self.as_json:  # drop a line cut by an interruption before appending
                self.path.write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records), encoding="utf-8"
                )
        elif self.path.exists():
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {r.get("prompt") for r in self.records}

    def _read_existing(self) -> list[dict]:
        text = self.path.read_text(encoding="utf-8")
        if self.as_json:
            try:
                data = json.loads(text or "[]")
            except json.JSONDecodeError:
                raise DecodeKitError(f"--resume: {self.path} is not valid JSON") from None
            return list(data)
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by an interruption: that prompt is redone
        return records

    def write(self, records: Sequence[dict]) -> None:
        self.records.extend(records)
        self.done.update(r["prompt"] for r in records)
        if self.as_json:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.records, ensure_ascii=False, indent=2), encoding="utf-8")
            os.replace(tmp, self.path)
            return
        with self.path.open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
