"""Background loops of the server: `PollLoop`, a daemon thread calling `check()` every
`poll_seconds` (the bundle and experiment watchers), and `Backoff`, the retry delays of the
store's LISTEN connection and of the first connection to the store."""
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


class PollLoop:
    """A daemon thread calling `check()` now and then every `poll_seconds` until stopped; an
    exception is logged and the loop goes on (a watcher must outlive any bad bundle)."""

    def __init__(self, name: str, poll_seconds: float):
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def check(self) -> bool:
        """One poll (subclasses)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start polling (the first check runs immediately)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and wait for a check in progress to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        """Poll until stopped; never dies on an error."""
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the loop must outlive any bad input
                log.exception("%s check failed", self._thread.name)
            self._stop.wait(self.poll_seconds)
