"""What the event store adds on top of a loaded bundle: applied events and users' recent items.

Each `ServingModel` carries `position`, the last store event applied to it (it starts at the
bundle's `event_watermark`: the bundle already covers everything up to there), and an
`Interactions` table of the items each user interacted with since the bundle. `apply_event`
applies one event: an upsert is encoded with the model's encoder and inserted (replacing the
item), a delete removes the item, interactions are added to the user's table.

Fold-in (`FoldIn`): a known user's query is the documented blend

    q = |u| * ((1 - w) * u / |u| + w * r / |r|),   w = n / (n + half)

of the user vector u and the mean r of the vectors of the user's last `items` recorded items
(n of them in the index), so one interaction moves the query by 1/(1 + half) of the way and many
interactions move it most of the way; with PerPEFT groups r is masked to the user's group block.
A user the bundle does not know gets r alone (the recent-items fold-in), from the request's
`recent_item_ids` plus the recorded items.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from index.events import DELETE, INTERACTIONS, UPSERT, Event
from serve.polling import Backoff, Daemon

log = logging.getLogger(__name__)


class FoldIn(BaseModel):
    """How recorded interactions move a known user's query."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    half: float = Field(5.0, gt=0, description="interactions at which recent items weigh half")
    items: int = Field(20, ge=1, description="last recorded items averaged into the query")
    per_user: int = Field(10_000, ge=1, description="recorded items kept per user (excluded as "
                          "seen); older ones stay in the store and the next training set")


class Interactions:
    """Distinct items per user in order of last interaction, bounded per user."""

    def __init__(self, per_user: int = 10_000):
        self.per_user = per_user
        self._users: dict[int, dict[int, None]] = {}
        self._lock = threading.Lock()
        self.total = 0

    def __len__(self) -> int:
        return len(self._users)

    def add(self, user_id: int, item_ids: np.ndarray) -> None:
        """Record that a user interacted with these items (most recent last)."""
        with self._lock:
            items = self._users.setdefault(int(user_id), {})
            for item in item_ids.tolist():
                items.pop(item, None)
                items[item] = None
            while len(items) > self.per_user:
                items.pop(next(iter(items)))
            self.total += len(item_ids)

    def items(self, user_id: int) -> np.ndarray:
        """The user's recorded items, oldest first (empty for a user with none)."""
        with self._lock:
            items = self._users.get(int(user_id))
            if not items:
                return np.empty(0, dtype=np.int64)
            return np.fromiter(items, dtype=np.int64, count=len(items))


def blend(user: np.ndarray, recent: np.ndarray | None, n: int, fold: FoldIn,
          groups: int = 1) -> np.ndarray:
    """The fold-in query of a known user: u moved towards the recent items' mean r."""
    if recent is None or n == 0:
        return user
    if groups > 1:
        recent = recent * (user != 0)  # PerPEFT: stay inside the user's group block
    u_norm, r_norm = float(np.linalg.norm(user)), float(np.linalg.norm(recent))
    if u_norm == 0 or r_norm == 0:
        return user
    w = n / (n + fold.half)
    return (u_norm * ((1 - w) * user / u_norm + w * recent / r_norm)).astype(np.float32)  # (d,)


def apply_event(model, event: Event, vector: np.ndarray | None = None) -> None:
    """Apply one event to a model (ServeError when an upsert cannot be encoded)."""
    if event.kind == UPSERT:
        vec = vector if vector is not None else model.encode(event.image, event.text)
        model.insert(event.item_id, vec, overwrite=True)
    elif event.kind == DELETE:
        if model.has_item(event.item_id):
            model.remove(event.item_id)
    elif event.kind == INTERACTIONS:
        model.online.add(event.user_id, event.item_ids)


class ListenLoop:
    """Keeps one LISTEN connection open (reconnecting with backoff) and wakes the poller on every
    notification and after every reconnect; the poll stays the fallback for anything missed."""

    WAIT_S = 1.0  # longest block in the listener, so stop() is noticed within it

    def __init__(self, listener, wake: threading.Event, stop: threading.Event, metrics,
                 poll_seconds: float):
        self.listener, self.wake, self.stop, self.metrics = listener, wake, stop, metrics
        self.poll_seconds = poll_seconds
        self.thread = threading.Thread(target=self._run, name="event-listener", daemon=True)

    def _run(self) -> None:
        """Listen until stopped; a failure is logged once per outage and counted each time."""
        backoff, up, logged = Backoff(cap=30.0), False, False
        while not self.stop.is_set():
            try:
                if not up:
                    self.listener.connect()
                    up = True
                    self.metrics.store_listening.set(1)
                    if logged:
                        log.info("LISTEN on %s is back: other processes' writes apply at once",
                                 self.listener.display)
                    logged = False
                    backoff.reset()
                    self.wake.set()  # catch up on what was committed while not listening
                if self.listener.wait(self.WAIT_S):
                    self.wake.set()
            except Exception as err:  # noqa: BLE001 - the loop must outlive any outage
                up = False
                self.metrics.store_listening.set(0)
                self.metrics.store_listen_failures.inc()
                if not logged:
                    log.warning("LISTEN on the event store failed (%s: %s); reconnecting with "
                                "backoff, other processes' writes apply every %.1f s meanwhile",
                                type(err).__name__, err, self.poll_seconds)
                    logged = True
                self.stop.wait(backoff.next())
        self.listener.close()
        self.metrics.store_listening.set(0)


class Poller(Daemon):
    """Applies other writers' events every `poll_seconds`, and at once when the store's LISTEN
    connection (PostgreSQL, `listen`) reports a commit; exports the store's gauges."""

    def __init__(self, holder, metrics, poll_seconds: float = 2.0, listen: bool = True):
        super().__init__("event-poller")
        self.holder, self.metrics, self.poll_seconds = holder, metrics, poll_seconds
        self._wake = threading.Event()
        listener = holder.store.listener() if listen else None
        self.listen = None if listener is None else ListenLoop(
            listener, self._wake, self._stop, metrics, poll_seconds)
        self._last_error = 0.0
        self._last_gauges = 0.0

    def start(self) -> None:
        """Start polling (and listening)."""
        super().start()
        if self.listen is not None:
            self.listen.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and listening."""
        self._stop.set()
        self._wake.set()  # after _stop: the woken loop sees it and returns
        super().stop(timeout)
        if self.listen is not None and self.listen.thread.is_alive():
            self.listen.thread.join(timeout)

    def _run(self) -> None:
        """Poll on every wake-up or after `poll_seconds` until stopped; never dies on an error."""
        while True:
            self._wake.wait(self.poll_seconds)
            if self._stop.is_set():
                return
            self._wake.clear()  # a commit notified during the poll wakes the next one
            self.poll()

    def poll(self) -> None:
        """One catch-up (and gauge update, at most every poll_seconds); store errors are logged
        (at most every 30 s)."""
        try:
            self.holder.catch_up()
            if time.monotonic() - self._last_gauges >= self.poll_seconds:
                self.metrics.store_bytes.set(self.holder.store.disk_bytes())
                self._last_gauges = time.monotonic()
        except Exception as err:  # noqa: BLE001 - the poller must outlive a store outage
            self.metrics.store_errors.labels(op="read").inc()
            if time.monotonic() - self._last_error > 30:
                log.warning("event store poll failed (serving on): %s: %s", type(err).__name__,
                            err)
                self._last_error = time.monotonic()
