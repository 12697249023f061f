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


def encode_prompts(tokenizer, prompts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Token ids per prompt, through the chat template when asked (and when there is one)."""
    rows = []
    for text in prompts:
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                return_dict=False,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        rows.append(list(ids))
    return rows


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
