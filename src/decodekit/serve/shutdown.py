"""Graceful shutdown of ``decodekit serve``: SIGTERM (or Ctrl+C) drains, then the process exits 0.

The first signal starts a ``Drain``: the server stops accepting (new completions answer 503
``server_shutting_down``, ``/health`` answers 503 ``draining``), requests already accepted run on
for up to ``grace`` seconds; any still queued or running then are cancelled (an error event in
their stream, a 503 body otherwise, naming the reason). uvicorn then closes its connections and
``serve`` returns 0. A second signal exits at once.

uvicorn's own handler re-raises the signal after its shutdown (the process then dies by it,
status -15); ``graceful_server`` handles the signals itself instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Drain", "graceful_server", "SHUTDOWN_CODE"]

SHUTDOWN_CODE = "server_shutting_down"
POLL_S = 0.05


class Drain:
    """Draining state of one server: ``begin`` once; ``draining`` from then on."""

    def __init__(self, engine, grace: float):
        self.engine, self.grace = engine, grace
        self.draining = False
        self.cancelled = 0  # requests still running when the grace period ended
        self.finished = threading.Event()

    def begin(self, on_done: Callable[[], None] = lambda: None) -> None:
        """Stop accepting; in a thread, wait for the engine to empty (at most ``grace`` s), cancel
        the rest, then ``on_done()``."""
        if self.draining:
            return
        self.draining = True
        threading.Thread(target=self._run, args=(on_done,), name="decodekit-drain", daemon=True).start()

    def busy(self) -> int:
        """Requests queued or running."""
        if self.engine is None:
            return 0
        metrics = self.engine.metrics()
        return metrics["requests_running"] + metrics["queue_depth"]

    def _run(self, on_done: Callable[[], None]) -> None:
        deadline = time.monotonic() + self.grace
        while self.busy() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.cancelled = self.busy()
        if self.cancelled:
            self.engine.stop(f"the server is shutting down: the request was cancelled after the "
                             f"{self.grace:g} s grace period", SHUTDOWN_CODE)
        print(f"decodekit serve: drained ({self.cancelled} request(s) cancelled); exiting", flush=True)
        self.finished.set()
        on_done()


def graceful_server(config, drain: Drain):
    """A ``uvicorn.Server`` whose SIGTERM/SIGINT start ``drain`` (see the module docstring)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if drain.draining:  # a second signal: exit now
                self.should_exit = self.force_exit = True
                return
            print(f"decodekit serve: signal {sig}: draining (grace {drain.grace:g} s)", flush=True)
            drain.begin(self.exit_soon)

        def exit_soon(self) -> None:
            self.should_exit = True

    return GracefulServer(config)

