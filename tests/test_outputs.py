"""Per-request results (``decodekit.outputs``): the tracker's timing of each row."""

from __future__ import annotations

import pytest

from decodekit import outputs
from decodekit.outputs import RequestStats, RowTracker


def test_first_token_time_and_decode_rate(monkeypatch):
    clock = iter([10.0, 11.0, 11.5, 12.0])  # start, then one push each
    monkeypatch.setattr(outputs.time, "perf_counter", lambda: next(clock))
    tracker = RowTracker([3, 5], max_new_tokens=10)
    tracker.push([[7], [8]])  # the first token of each row, after the prefill: 1 s
    tracker.push([[7, 7], [8]])  # a verify step may emit several
    tracker.push([[7], [8, 8, 8]])
    first, second = tracker.stats
    assert first.first_token_seconds == second.first_token_seconds == 1.0
    assert first.seconds == 2.0 and first.new_tokens == 4 and second.new_tokens == 5
    assert first.decode_tokens_per_s == pytest.approx(3 / 1.0)
    assert second.decode_tokens_per_s == pytest.approx(4 / 1.0)
    assert first.to_dict()["first_token_seconds"] == 1.0


def test_a_row_that_joins_late_times_its_own_first_token(monkeypatch):
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(outputs.time, "perf_counter", lambda: next(clock))
    tracker = RowTracker([3, 3], max_new_tokens=10)
    tracker.push([[5], []])  # row 1 emits nothing yet
    tracker.push([[5], [6]])
    assert [s.first_token_seconds for s in tracker.stats] == [1.0, 2.0]


def test_no_decode_rate_without_a_second_token():
    assert RequestStats(new_tokens=1, seconds=1.0, first_token_seconds=1.0).decode_tokens_per_s == 0.0
