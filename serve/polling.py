"""Background threads of the server: `Daemon`, a stoppable daemon thread (the event poller, the
impression writer, the first connection to the store); `PollLoop`, one calling `check()` every
`poll_seconds` (the bundle and experiment watchers); and `Backoff`, the retry delays of the store's
LISTEN connection and of the first connection to the store."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Backoff:
    """Retry delays: `first` seconds, doubling up to `cap`; `reset()` after a success."""

    def __init__(self, first: float = 0.5, cap: float = 10.0):
        self.first, self.cap = first, cap
        self._delay = first

    def next(self) -> float:
        """The delay before the next try."""
        delay, self._delay = self._delay, min(self._delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        """Start again from the first delay."""
        self._delay = self.first


class Daemon:
    """A named daemon thread running `_run()` until `stop()` sets `_stop`; `stop` waits for it."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        """The thread's body (subclasses); returns once `_stop` is set."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to end and wait for the work in progress to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


class PollLoop(Daemon):
    """A daemon thread calling `check()` at once and then every `poll_seconds` until stopped; an
    exception is logged and the loop goes on (a watcher must outlive any bad bundle)."""

    def __init__(self, name: str, poll_seconds: float):
        super().__init__(name)
        self.poll_seconds = poll_seconds

    def check(self) -> bool:
        """One poll (subclasses)."""
        raise NotImplementedError

    def _run(self) -> None:
        """Poll until stopped; never dies on an error."""
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the loop must outlive any bad input
                log.exception("%s check failed", self._thread.name)
            self._stop.wait(self.poll_seconds)
