"""The impression log: shown lists queued on the request thread, written in batches by another.

`offer` is all a request does: one `queue.put_nowait` (no database round trip, never blocks); a
full queue drops the impression and counts it (`recsys_impressions_total{result="dropped"}`).
The writer thread takes up to `batch` rows, or what arrived within `flush_seconds`, and commits
them in one transaction (index.events.impressions) on its own store connection, so it never
holds the lock of the acknowledged writes. A failed write is retried at the next flush, three
times, then dropped and counted (`result="failed"`). `stop` writes what is queued.

What a crash can lose: the impressions queued and not yet committed, i.e. about the last
`flush_seconds` of them (at most `queue`), plus a batch being retried while the store is down.
Impressions are measurement, not state: a lost one lowers the counts of both arms alike and
biases nothing, whereas the interactions they are matched to are durable events.
"""
from __future__ import annotations

import logging
import queue
import time

from index.events import SQLStore, StoreError
from index.events import impressions as imp_store
from index.events.impressions import Impression
from serve.experiment_config import Impressions
from serve.metrics import Metrics
from serve.polling import Daemon

log = logging.getLogger(__name__)
RETRIES = 3


class ImpressionWriter(Daemon):
    """A bounded queue of impressions and the thread that commits them in batches."""

    def __init__(self, store: SQLStore, metrics: Metrics, spec: Impressions):
        super().__init__("impression-writer")
        self.store, self.metrics, self.spec = store, metrics, spec
        self._queue: queue.Queue[Impression] = queue.Queue(maxsize=spec.queue)
        self._pending: list[Impression] = []
        self._tries = 0

    def start(self) -> None:
        """Create the table and start the writer thread."""
        imp_store.ensure_schema(self.store)
        super().start()

    def offer(self, impression: Impression) -> bool:
        """Queue an impression without blocking; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(impression)
        except queue.Full:
            self.metrics.impressions.labels(result="dropped").inc()
            return False
        self.metrics.impressions.labels(result="queued").inc()
        return True

    def _run(self) -> None:
        """Collect and write batches until stopped, then flush the rest."""
        while not self._stop.is_set():
            self._collect(time.monotonic() + self.spec.flush_seconds)
            self._flush()
        self._collect(0.0)
        while self._pending and self._flush():
            self._collect(0.0)

    def _collect(self, deadline: float) -> None:
        """Move queued rows into the pending batch until it is full or the deadline passes."""
        while len(self._pending) < self.spec.batch:
            wait = deadline - time.monotonic()
            try:
                item = (self._queue.get(timeout=min(wait, 0.2)) if wait > 0
                        else self._queue.get_nowait())
            except queue.Empty:
                if wait <= 0 or self._stop.is_set():
                    return
                continue
            self._pending.append(item)
        self.metrics.impression_queue.set(self._queue.qsize())

    def _flush(self) -> bool:
        """Commit the pending batch; returns whether it is gone (written or given up)."""
        if not self._pending:
            return True
        try:
            imp_store.append(self.store, self._pending)
        except StoreError as err:
            self._tries += 1
            if self._tries < RETRIES:
                log.warning("writing %d impressions failed (retrying): %s", len(self._pending),
                            err)
                return False
            log.error("dropping %d impressions after %d failed writes: %s", len(self._pending),
                      self._tries, err)
            self.metrics.impressions.labels(result="failed").inc(len(self._pending))
        else:
            self.metrics.impressions.labels(result="written").inc(len(self._pending))
        self._pending, self._tries = [], 0
        self.metrics.impression_queue.set(self._queue.qsize())
        return True
