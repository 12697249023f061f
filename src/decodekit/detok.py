"""Token ids in, text out, a few tokens at a time: streaming that never breaks a character.

A byte-level tokenizer splits one emoji, CJK or accented character over several tokens;
decoding them one by one gives U+FFFD. ``IncrementalDetokenizer`` keeps two offsets into
the ids (the prefix/read-offset technique of vLLM and text-generation-inference):

* ``prefix_offset``: start of a small window of already-emitted tokens, decoded again as
  context (sentencepiece tokenizers drop the leading space of the first decoded token, so
  the new text is the difference between two decodes of the same window start);
* ``read_offset``: end of the emitted tokens.

Each ``push`` decodes ``ids[prefix_offset:read_offset]`` and ``ids[prefix_offset:]`` and
emits the difference, unless it ends in U+FFFD (an incomplete character): then the tokens
wait for the next push. The work per push is the window, not the whole text.

``TextCallbackStreamer`` turns ``callback(row, text)`` into the ``callback(row, token_ids)``
streamer that ``decodekit.generate`` accepts, one detokenizer per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["IncrementalDetokenizer", "TextCallbackStreamer"]

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """``push(token_ids) -> new text``; ``flush() -> the rest``. The pieces joined equal
    ``tokenizer.decode(all_ids, skip_special_tokens=...)``."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: emitted tokens decoded again as context
        self.read_offset = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending_text(self) -> str:
        """Text of the tokens after ``read_offset`` (may end in an incomplete character)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        return text[len(prefix) :] if len(text) > len(prefix) else ""

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; returns the newly completed text ("" while a character is incomplete)."""
        self.ids.extend(int(t) for t in token_ids)
        if self.read_offset == len(self.ids):
            return ""
        new = self._pending_text()
        if not new or new.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        new = self._pending_text()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new


class TextCallbackStreamer:
    """A ``streamer`` for ``decodekit.generate`` that calls ``callback(row, text)`` with
    complete text only; ``end()`` (called when generation finishes) flushes every row."""

    def __init__(self, tokenizer, callback: Callable[[int, str], None], skip_special_tokens: bool = True):
        self.tokenizer, self.callback = tokenizer, callback
        self.skip_special_tokens = skip_special_tokens
        self.rows: dict[int, IncrementalDetokenizer] = {}

    def __call__(self, row: int, token_ids: list[int]) -> None:
        detok = self.rows.get(row)
        if detok is None:
            detok = self.rows[row] = IncrementalDetokenizer(self.tokenizer, self.skip_special_tokens)
        text = detok.push(token_ids)
        if text:
            self.callback(row, text)

    def end(self) -> None:
        for row, detok in sorted(self.rows.items()):
            text = detok.flush()
            if text:
                self.callback(row, text)
