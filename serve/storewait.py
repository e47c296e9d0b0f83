"""Reaching the event store at start: PostgreSQL may come up after the server (Kubernetes).

`StoreWait` runs in its own thread from the moment the gRPC server is up: it creates the store's
schema (the first connection), retrying with backoff (0.5 s doubling to 10 s) while the store is
unreachable, and logs once when it starts waiting and once when the store answers. Meanwhile
health stays NOT_SERVING and every RPC answers UNAVAILABLE naming the store. Once the store
answers it calls `on_ready` (which starts the bundle watcher: load, replay the store, SERVING).
After `wait_seconds` (0: forever) without an answer, or at once on an error that waiting cannot
fix (a schema of another version), it calls `on_give_up` with a message naming the store without
its password; `python -m serve` then exits with code 2.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from index.events import SQLStore, StoreError, StoreUnavailable
from serve.polling import Backoff, Daemon

log = logging.getLogger(__name__)


class StoreWait(Daemon):
    """Background first connection to the event store, with backoff and a deadline."""

    def __init__(self, store: SQLStore, metrics, wait_seconds: float,
                 on_ready: Callable[[], None], on_give_up: Callable[[str], None]):
        self.store, self.metrics, self.wait_seconds = store, metrics, wait_seconds
        self.on_ready, self.on_give_up = on_ready, on_give_up
        self.waiting_for: str | None = "the event store has not been reached yet"
        super().__init__("store-wait")  # stop(): a try in progress ends within the connect timeout

    def _run(self) -> None:
        """Try until the store answers, the deadline passes or stop()."""
        start, backoff, err = time.monotonic(), Backoff(cap=10.0), None
        deadline = None if self.wait_seconds == 0 else start + self.wait_seconds
        while not self._stop.is_set():
            try:
                self.store.create()
            except StoreUnavailable as unreachable:
                failure = " ".join(str(unreachable).split())  # psycopg's message spans lines
                self.metrics.store_errors.labels(op="connect").inc()
                if err is None:
                    log.warning("event store unreachable: %s; health NOT_SERVING, retrying with "
                                "backoff %s", failure, "until it answers" if deadline is None
                                else f"for up to {self.wait_seconds:g} s")
                err = failure
                self.waiting_for = f"waiting for the event store: {failure}"
                if deadline is not None and time.monotonic() >= deadline:
                    return self._give_up(f"gave up waiting for the event store after "
                                         f"{self.wait_seconds:g} s (--store-wait-seconds): {err}")
                pause = backoff.next()
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                self._stop.wait(pause)
                continue
            except StoreError as failure:  # e.g. another schema version: waiting cannot help
                return self._give_up(f"cannot use the event store: {failure}")
            if err is not None:
                log.info("event store %s answered after %.1f s; loading the bundle",
                         self.store.display, time.monotonic() - start)
            self.waiting_for = None
            self.metrics.store_ready.set(1)
            self.on_ready()
            return

    def _give_up(self, message: str) -> None:
        """Report a start that cannot succeed."""
        message = " ".join(message.split())
        self.waiting_for = message
        self.on_give_up(message)
