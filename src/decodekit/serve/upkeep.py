"""A lane's upkeep between steps (``serve.engine``): rows of requests that are gone leave, and
the left padding every remaining row shares is dropped once it piles up. Now and then the
engine hands freed heap pages back to the OS (``HeapTrimmer``).

``run`` is a lane's run: ``run.req.tracker`` maps its active rows to their requests
(``owner[row] -> (job, local row)``); a job is ``cancelled`` (client gone, timed out) or
``over`` (done or failed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

__all__ = ["drop_gone", "trim_padding", "HeapTrimmer", "TRIM_MIN_COLUMNS"]

TRIM_MIN_COLUMNS = 32  # a lane's shared left padding is dropped once this wide (and >= 1/4 of it)


class HeapTrimmer:
    """glibc's ``malloc_trim(0)`` at most every ``every_s`` seconds: the pages of tensors that
    were freed (rows that left, caches compacted) go back to the OS instead of staying in the
    heap, so the server's RSS follows what it holds. A no-op without glibc."""

    def __init__(self, every_s: float = 5.0):
        self.every_s, self.last = every_s, time.monotonic()
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        self.trim = getattr(libc, "malloc_trim", None)

    def __call__(self) -> None:
        now = time.monotonic()
        if self.trim is not None and now - self.last >= self.every_s:
            self.trim(0)
            self.last = now


def trim_padding(run) -> None:
    """Drop the columns that are left padding in every row once they pile up. A lane that
    never empties (a busy server) would otherwise keep every column since it started: newcomers
    are padded to its width, and its cache and attention work grow without bound."""
    state = run.state
    if run.req.tracker.done or state is None or not state.length:
        return
    lead = int((state.mask.any(0).cumsum(0) == 0).sum())  # leading columns no row uses
    if lead >= max(TRIM_MIN_COLUMNS, state.length // 4):
        state.compact()  # exact: positions come from the mask


def drop_gone(run) -> None:
    """Rows of cancelled (client gone, timed out) or failed requests leave the lane."""
    tracker = run.req.tracker
    gone = [tracker.owner[g][0].cancelled or tracker.owner[g][0].over for g in tracker.active]
    if any(gone):
        for job in {id(j): j for j, _ in tracker.owner.values() if j.cancelled}.values():
            job.close()
        run.drop_finished(gone)
