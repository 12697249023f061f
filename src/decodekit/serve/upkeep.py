"""A lane's upkeep between steps (``serve.engine``): rows of requests that are gone leave, and
the left padding every remaining row shares is dropped once it piles up.

``run`` is a lane's run: ``run.req.tracker`` maps its active rows to their requests
(``owner[row] -> (job, local row)``); a job is ``cancelled`` (client gone, timed out) or
``over`` (done or failed).
"""

from __future__ import annotations

__all__ = ["drop_gone", "trim_padding", "TRIM_MIN_COLUMNS"]

TRIM_MIN_COLUMNS = 32  # a lane's shared left padding is dropped once this wide (and >= 1/4 of it)


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
