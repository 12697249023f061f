"""Prompts in, results out: the one implementation every command uses.

* ``load_prompts`` reads ``--prompt`` or ``--prompts_file`` (.txt one prompt a line, .json a
  list, .jsonl objects with a "prompt" field) and names the line of any bad entry.
* ``encode_prompts`` applies the chat template (or not) and tokenizes.
* ``ResultWriter`` appends each finished batch to the output file at once (.jsonl, or a
  .json list rewritten atomically). It checks everything before the model loads, touches no
  existing file until the first batch is done, and with ``resume`` skips the prompts already
  written (matched by their index in the prompts file), so no run loses a result.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from decodekit.validation import DecodeKitError

__all__ = ["load_prompts", "encode_prompts", "iter_batches", "ResultWriter", "make_record"]

log = logging.getLogger(__name__)


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
            with TOKENIZER_LOCK:
                ids = tokenizer.apply_chat_template(_user_turn(text), add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        elif chat:
            ids = _encode_chat_turn(tokenizer, text)
        else:
            ids = encode_text(tokenizer, text, True, not allow_special_tokens)
        rows.append(list(ids))
    return rows


# transformers' fast tokenizers keep ``split_special_tokens`` as a flag of the one shared Rust
# tokenizer, set by each call right before it encodes: two threads encoding at once (the
# server parses requests on a thread pool) can each encode with the other's flag.
TOKENIZER_LOCK = threading.Lock()


def encode_text(tokenizer, text: str, add_special_tokens: bool, split_special_tokens: bool) -> list[int]:
    """``tokenizer(text)``'s ids, from any thread: one encode at a time (``TOKENIZER_LOCK``),
    so a chat template's ``<|im_start|>`` is never split into text because another thread
    asked to split special tokens at the same moment."""
    with TOKENIZER_LOCK:
        out = tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=split_special_tokens)
    return list(out["input_ids"])


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
        return encode_text(tokenizer, part, False, split) if part else []

    return (encode(rendered[:head], False) + encode(rendered[head:tail], True)
            + encode(rendered[tail:], False))


def iter_batches(items: Sequence, batch_size: int) -> Iterator[list]:
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def make_record(prompt: str, prompt_ids: Sequence[int], response_ids: Sequence[int], tokenizer,
                stats: dict | None = None, prompt_text: str | None = None, index: int | None = None,
                sample_index: int | None = None) -> dict:
    """One result with the seed's fields (+ token ids and stats). ``index`` is the prompt's
    position in the prompts file; ``sample_index`` numbers a prompt's results when it has
    several (beam ``num_return_sequences``)."""
    response = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    shown_prompt = prompt_text if prompt_text is not None else tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    record = {} if index is None else {"index": index}
    if sample_index is not None:
        record["sample_index"] = sample_index
    record.update({
        "prompt": prompt,
        "response": response,
        "full_text": shown_prompt + tokenizer.decode(list(response_ids), skip_special_tokens=False),
        "prompt_length": len(prompt_ids),
        "response_length": len(response_ids),
        "total_length": len(prompt_ids) + len(response_ids),
        "response_token_ids": list(map(int, response_ids)),
    })
    if stats is not None:
        record["stats"] = stats
    return record


def _key(record: dict) -> tuple[int, int]:
    return record["index"], record.get("sample_index", 0)


def _count_results(text: str, as_json: bool) -> str:
    """``"holds N results"`` for the refusal message (the file need not be valid)."""
    if not as_json:
        count = sum(1 for line in text.split("\n") if line.strip())
        return f"holds {count} results"
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return "is not empty"
    return f"holds {len(data)} results" if isinstance(data, list) else "is not empty"


def _new_file_mode(path: Path) -> int:
    """The mode the replaced file keeps (its own, or what ``open`` would give a new one)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


class ResultWriter:
    """Results of one run over ``prompts``, written batch by batch to ``path``: JSON Lines
    appended and fsynced, or (``.json``) a list rewritten atomically.

    The constructor writes nothing: it reads an existing file, refuses a non-empty one unless
    ``resume`` (its results are kept, matched to ``prompts`` by ``index`` and ``prompt``) or
    ``overwrite``, and proves that the file can be written, so a run that fails before its
    first batch leaves the file byte-identical. The first ``write`` replaces the file
    atomically (a new file, ``overwrite``, or a last line cut by an interrupt to drop); later
    ones, and a resumed intact ``.jsonl``, append. ``per_prompt``: results per prompt
    (``sample_index`` 0..per_prompt-1); a prompt is done when all of them are there.
    """

    def __init__(self, path: str | os.PathLike, prompts: Sequence[str], *, per_prompt: int = 1,
                 resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise DecodeKitError("give --resume (continue output_file) or --overwrite (replace it), not both")
        self.path = Path(path)
        self.as_json = self.path.suffix.lower() == ".json"
        self.prompts, self.per_prompt = list(prompts), per_prompt
        self.records: list[dict] = []
        self.keys: set[tuple[int, int]] = set()  # (index, sample_index) of every result in the file
        self.replace_next = True  # the next write replaces the whole file
        if self.path.is_dir():
            raise DecodeKitError(f"output_file {str(self.path)!r} is a directory")
        text = "" if overwrite else self._existing_text()
        if text.strip() and not resume:
            raise DecodeKitError(
                f"output_file {self.path} exists and {_count_results(text, self.as_json)}; pass --resume to "
                "continue it or --overwrite to replace it"
            )
        if text.strip():
            self.records = self._read_json(text) if self.as_json else self._read_jsonl(text)
            self.replace_next = self.as_json or not text.endswith("\n")
        self._check_writable()

    @property
    def done(self) -> set[int]:
        """Indices of the prompts that have all their results."""
        counts = Counter(i for i, _ in self.keys)
        return {i for i, n in counts.items() if n >= self.per_prompt}

    def pending(self) -> list[int]:
        """Indices of the prompts still to run, in order."""
        done = self.done
        return [i for i in range(len(self.prompts)) if i not in done]

    def _existing_text(self) -> str:
        if not self.path.exists():
            return ""
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DecodeKitError(f"output_file {self.path} cannot be read: {exc}") from None

    def _read_json(self, text: str) -> list[dict]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DecodeKitError(f"output_file {self.path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        if not isinstance(data, list):
            raise DecodeKitError(
                f"output_file {self.path} holds a JSON {type(data).__name__}, not a list of results: "
                "--resume cannot continue it"
            )
        records: list[dict] = []
        for n, entry in enumerate(data):
            self._add_existing(records, entry, f"item {n}")
        return records

    def _read_jsonl(self, text: str) -> list[dict]:
        lines = text.split("\n")  # not splitlines(): a result may hold a raw U+2028
        records: list[dict] = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                if n == len(lines):  # the last line, without its newline: a write cut short
                    log.warning("output_file %s line %d is cut short (an interrupted write): dropped, "
                                "its prompt is run again", self.path, n)
                    continue
                raise DecodeKitError(f"output_file {self.path} line {n}: invalid JSON ({exc.msg})") from None
            self._add_existing(records, entry, f"line {n}")
        return records

    def _add_existing(self, records: list[dict], entry, where: str) -> None:
        """Check one result of the file against this run's prompts and keep it."""
        where = f"output_file {self.path} {where}"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) \
                or type(entry.get("index")) is not int:
            raise DecodeKitError(f"{where}: not a result (an object with \"index\" and \"prompt\")")
        index, sample = entry["index"], entry.get("sample_index", 0)
        if not 0 <= index < len(self.prompts) or self.prompts[index] != entry["prompt"]:
            raise DecodeKitError(
                f"{where}: prompt {index} {entry['prompt'][:40]!r} does not match --prompts_file "
                f"({len(self.prompts)} prompts); resume with the prompts file that made it"
            )
        if type(sample) is not int or not 0 <= sample < self.per_prompt:
            raise DecodeKitError(
                f"{where}: sample_index {sample!r}, but this run makes {self.per_prompt} result(s) per "
                "prompt (--num_return_sequences)"
            )
        if (index, sample) in self.keys:
            raise DecodeKitError(f"{where}: a second result for prompt {index} (sample {sample})")
        self.keys.add((index, sample))
        records.append(entry)

    def _check_writable(self) -> None:
        """Create the folder if needed and a scratch file in it (removed again); open an
        existing file for appending. Nothing the run needs is left untested."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, scratch = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".check")
            os.close(fd)
            os.unlink(scratch)
            if not self.replace_next:
                with self.path.open("a", encoding="utf-8"):
                    pass
        except OSError as exc:
            raise DecodeKitError(f"output_file {self.path} cannot be written: {exc.strerror or exc}") from None

    def write(self, records: Sequence[dict]) -> None:
        """Add a finished batch (a result already in the file is not written twice)."""
        new = [r for r in records if _key(r) not in self.keys]
        self.keys.update(_key(r) for r in new)
        self.records.extend(new)
        if self.as_json or self.replace_next:
            self._replace()
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            fh.flush()
            os.fsync(fh.fileno())

    def _replace(self) -> None:
        """Write every result to a scratch file next to ``path``, then rename it over ``path``."""
        if self.as_json:
            text = json.dumps(self.records, ensure_ascii=False, indent=2)
        else:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
        fd, scratch = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, _new_file_mode(self.path))
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(scratch, self.path)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise
        self.replace_next = False
