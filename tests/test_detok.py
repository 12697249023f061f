"""Incremental detokenization with the bundled (byte-level BPE) tokenizer: characters split
over several tokens are emitted once, whole, in the CLI stream and the draft view alike."""

import random

import pytest

import decodekit
from decodekit.batch_runner import TerminalStream
from decodekit.detok import IncrementalDetokenizer, TextCallbackStreamer
from decodekit.outputs import RowTracker
from decodekit.visual import render_drafts

TEXTS = {
    "emoji": "😀 happy, 😢 sad and 😠 angry! 👨‍👩‍👧‍👦 🇫🇷",
    "cjk": "日本語のテキスト、中文文本。한국어",
    "arabic": "مرحبا بالعالم",
    "hebrew": "שלום עולם",
    "combining": "e\u0301 a\u0300 n\u0303 ก่า",
    "ascii": "Hello, world. It's  two  spaces\n\nnew\tline",
    "mixed": "mix: hi 😀 日本 مرحبا שלום x\u0301 end",
}


def _stream(detok, ids, sizes):
    pieces, i = [], 0
    for n in sizes:
        pieces.append(detok.push(ids[i : i + n]))
        i += n
    return pieces, detok.flush()


@pytest.mark.parametrize("name", TEXTS)
def test_token_by_token_equals_decode_and_never_emits_a_broken_char(bundled_tokenizer, name):
    tok, text = bundled_tokenizer, TEXTS[name]
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    pieces, rest = _stream(IncrementalDetokenizer(tok), ids, [1] * len(ids))
    assert "".join(pieces) + rest == text
    assert not any("\ufffd" in p for p in pieces) and rest == ""
    rng = random.Random(len(ids))
    for _ in range(5):  # pushes of several tokens at once
        sizes = [rng.randint(1, 4) for _ in ids]
        pieces, rest = _stream(IncrementalDetokenizer(tok), ids, sizes)
        assert "".join(pieces) + rest == text and not any("\ufffd" in p for p in pieces)


def test_split_character_is_held_back_then_emitted_once(bundled_tokenizer):
    ids = bundled_tokenizer("😀")["input_ids"]
    assert len(ids) == 3  # one emoji, three byte-level tokens
    detok = IncrementalDetokenizer(bundled_tokenizer)
    assert [detok.push([t]) for t in ids] == ["", "", "😀"]
    assert detok.flush() == ""
    cut = IncrementalDetokenizer(bundled_tokenizer)
    assert cut.push(ids[:2]) == ""
    assert cut.flush() == bundled_tokenizer.decode(ids[:2]) == "\ufffd"  # an unfinished char, at the end only


def test_special_tokens_follow_skip_special_tokens(bundled_tokenizer):
    tok = bundled_tokenizer
    ids = tok("a 😀<|im_end|>b", split_special_tokens=False)["input_ids"]
    for skip in (True, False):
        pieces, rest = _stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, [1] * len(ids))
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip)


def test_work_per_push_is_a_window_not_the_whole_text(bundled_tokenizer):
    class Counting:
        def __init__(self, tok):
            self.tok, self.longest = tok, 0

        def decode(self, ids, **kw):
            self.longest = max(self.longest, len(ids))
            return self.tok.decode(ids, **kw)

    ids = bundled_tokenizer(" ".join([TEXTS["mixed"]] * 10))["input_ids"]
    counting = Counting(bundled_tokenizer)
    pieces, _ = _stream(IncrementalDetokenizer(counting), ids, [1] * len(ids))
    assert len(ids) > 200 and counting.longest <= 8


def test_terminal_stream_prints_emoji_whole(bundled_tokenizer, capsys):
    text = "Happy: 😀, sad: 😢, angry: 😠"
    ids = bundled_tokenizer(text)["input_ids"]
    stream = TerminalStream(bundled_tokenizer)
    for t in ids:
        stream(0, [t])
    stream.end()
    out = capsys.readouterr().out
    assert out == text + "\n" and "\ufffd" not in out


def test_text_callback_streamer_through_row_tracker(bundled_tokenizer):
    """The ``callback(row, token_ids)`` protocol that RowTracker (every strategy) drives."""
    tok = bundled_tokenizer
    rows = [tok(TEXTS["emoji"])["input_ids"], tok(TEXTS["cjk"])["input_ids"]]
    got = {0: [], 1: []}
    tracker = RowTracker([1, 1], max_new_tokens=100, streamer=TextCallbackStreamer(tok, lambda r, s: got[r].append(s)))
    for step in range(max(map(len, rows))):
        tracker.push([r[step : step + 1] for r in rows])
    out = tracker.result()
    assert out.sequences == rows
    assert ["".join(got[i]) for i in (0, 1)] == [TEXTS["emoji"], TEXTS["cjk"]]
    assert not any("\ufffd" in s for s in got[0] + got[1])


def test_text_callback_streamer_with_generate(bundled_tokenizer, llama):
    """``decodekit.generate`` accepts it (tiny model; its ids are valid tokenizer ids)."""
    texts = {}
    out = decodekit.generate(llama, [[5, 6, 7], [8, 9]], strategy="greedy", max_new_tokens=12,
                             streamer=decodekit.TextCallbackStreamer(
                                 bundled_tokenizer, lambda r, s: texts.setdefault(r, []).append(s)))
    assert out.sequences and all(
        "".join(texts.get(i, [])) == bundled_tokenizer.decode(seq, skip_special_tokens=True)
        for i, seq in enumerate(out.sequences))


def test_render_drafts_shows_each_character_once(bundled_tokenizer):
    tok = bundled_tokenizer
    text = TEXTS["mixed"]
    ids = tok(text)["input_ids"]
    kinds = ["target", "draft", "draft", "recovered", "bonus"]
    trace = [(t, kinds[i % len(kinds)]) for i, t in enumerate(ids)]
    plain = render_drafts(tok, trace, color=False)
    assert "\ufffd" not in plain
    assert plain.replace("[", "").replace("]", "").replace("{", "").replace("}", "") == text
    colored = render_drafts(tok, trace, color=True)
    assert colored.replace("\033[32m", "").replace("\033[1;31m", "").replace("\033[0m", "") == text
