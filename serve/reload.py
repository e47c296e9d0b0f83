"""Hot reload: the model holder, the upsert journal and the watcher thread.

The holder owns one reference, `holder.model`; the servicer reads it once per request, so a swap
never changes the model under a running request (in-flight requests finish on the old one, which
is freed when the last of them drops it).

The watcher polls `bundles/CURRENT` every `poll_seconds`. When it names a new version it loads
the bundle (`index.bundle.load_bundle` verifies every sha256), builds the `ServingModel`, runs a
smoke query (a Recommend and, with encoders, the encoding of a blank item), replays the journal,
and swaps, all off the request path. A bundle that fails any step is refused and logged,
`recsys_reloads_total{result="failure"}` counts it, the old model keeps serving, and the same
version is retried only after `retry_seconds` (or as soon as CURRENT names another version).
Publishing an older version rolls back the same way.

Upsert carry-over. Vectors from the old encoder are not comparable with a new model's space, so
the journal keeps the raw inputs (image bytes, text) of online upserts, plus online deletes, one
entry per item id (the latest operation wins). After a new bundle passes its smoke query, each
upsert is re-encoded with the new encoder and inserted, unless the new bundle already holds that
item (a bundle is authoritative for the items it was trained on: the entry is dropped); each
delete is re-applied. Upserts are dropped with a warning when the new bundle has no encoder or
cannot encode them. The journal is bounded (`journal_max_items` entries, `journal_max_bytes` of
raw payload): past either bound the oldest entries are evicted, so those upserts will be missing
from the next bundle and those deletes undone by it (counted in `recsys_journal_dropped_total`).
A replay costs one encode per journaled upsert, off the request path but delaying the swap. The journal lives in memory: a
restart forgets online changes, so production writers should also record items for the next
training run. Entries recorded while a replay runs are applied under the mutation lock just
before the swap, so no upsert is lost.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.bundle import current_version, load_bundle
from serve.errors import AlreadyExists, ServeError, Unavailable
from serve.metrics import Metrics
from serve.model import ServingModel

log = logging.getLogger(__name__)

UPSERT, DELETE = "upsert", "delete"


@dataclass(frozen=True)
class Entry:
    """One journaled online change."""

    seq: int
    op: str
    image: bytes = b""
    text: str = ""

    @property
    def size(self) -> int:
        """Bytes of raw payload held."""
        return len(self.image) + len(self.text.encode("utf-8", "surrogatepass"))


class Journal:
    """Bounded record of online upserts (raw inputs) and deletes since the bundle was built."""

    def __init__(self, max_items: int, max_bytes: int, metrics: Metrics | None = None):
        self.max_items, self.max_bytes, self.metrics = max_items, max_bytes, metrics
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._bytes = 0
        self._seq = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, item_id: int, op: str, image: bytes = b"", text: str = "") -> None:
        """Append (or replace) the entry of one item, then enforce the bounds."""
        with self._lock:
            self._seq += 1
            self._drop(item_id)
            entry = Entry(self._seq, op, image if op == UPSERT else b"", text if op == UPSERT else "")
            self._entries[item_id] = entry
            self._bytes += entry.size
            while self._entries and (len(self._entries) > self.max_items
                                     or self._bytes > self.max_bytes):
                oldest = next(iter(self._entries))
                log.warning("journal full: forgetting the online %s of item %d",
                            self._entries[oldest].op, oldest)
                self._drop(oldest)
                if self.metrics:
                    self.metrics.journal_dropped.inc()
        self._report()

    def entries(self, after: int = 0) -> list[tuple[int, Entry]]:
        """(item_id, entry) pairs with seq > after, oldest first."""
        with self._lock:
            return [(i, e) for i, e in self._entries.items() if e.seq > after]

    def last_seq(self) -> int:
        """Sequence number of the latest record."""
        return self._seq

    def forget(self, item_id: int, seq: int) -> None:
        """Remove an item's entry if it is still the one with this seq."""
        with self._lock:
            entry = self._entries.get(item_id)
            if entry is not None and entry.seq == seq:
                self._drop(item_id)
        self._report()

    def _drop(self, item_id: int) -> None:
        """Remove an entry (lock held)."""
        entry = self._entries.pop(item_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def _report(self) -> None:
        """Export the journal size."""
        if self.metrics:
            self.metrics.journal_entries.set(len(self._entries))


class ModelHolder:
    """The live model reference, the mutation lock and the journal."""

    def __init__(self, journal: Journal, metrics: Metrics | None = None):
        self.model: ServingModel | None = None
        self.name: str | None = None
        self.journal, self.metrics = journal, metrics
        self.mutation_lock = threading.Lock()

    def require(self) -> ServingModel:
        """The live model, or Unavailable before the first bundle is loaded."""
        model = self.model
        if model is None:
            raise Unavailable("no bundle is loaded yet")
        return model

    def upsert(self, item_id: int, image: bytes, text: str,
               overwrite: bool) -> tuple[bool, ServingModel]:
        """Encode (outside the lock) and insert an item; returns (replaced, model used)."""
        for _ in range(3):
            model = self.require()
            if not overwrite and model.has_item(item_id):
                raise AlreadyExists(f"item {item_id} is already in the index; set overwrite")
            vec = model.encode(image, text)
            with self.mutation_lock:
                if self.model is not model:
                    continue  # swapped while encoding: encode again with the new model
                replaced = model.insert(item_id, vec, overwrite)
                self.journal.record(item_id, UPSERT, image, text)
            self._report(model)
            return replaced, model
        raise Unavailable("the bundle changed three times during this upsert; retry")

    def delete(self, item_id: int) -> ServingModel:
        """Remove an item from the live index and journal the delete."""
        with self.mutation_lock:
            model = self.require()
            model.remove(item_id)
            self.journal.record(item_id, DELETE)
        self._report(model)
        return model

    def swap(self, model: ServingModel, name: str) -> None:
        """Replay the journal onto a smoke-tested model and make it live."""
        carried: set[int] = set()
        seq = self.journal.last_seq()
        replay(model, self.journal, self.journal.entries(), carried)
        with self.mutation_lock:
            replay(model, self.journal, self.journal.entries(after=seq), carried)
            self.model, self.name = model, name
        if carried:
            log.info("carried %d online upserts over to bundle v%d", len(carried), model.version)
        self._report(model)

    def _report(self, model: ServingModel) -> None:
        """Export the live model's gauges."""
        if self.metrics and model is self.model:
            self.metrics.loaded(model)


def replay(model: ServingModel, journal: Journal, entries: list[tuple[int, Entry]],
           carried: set[int]) -> None:
    """Apply journaled changes to a new model; `carried` collects the items re-encoded so far."""
    for item_id, entry in entries:
        if entry.op == DELETE:
            if model.has_item(item_id):
                model.remove(item_id)
            continue
        if item_id not in carried and model.has_item(item_id):
            log.info("item %d is in bundle v%d; dropping its online upsert", item_id, model.version)
            journal.forget(item_id, entry.seq)
            continue
        try:
            model.insert(item_id, model.encode(entry.image, entry.text), overwrite=True)
            carried.add(item_id)
        except ServeError as err:
            log.warning("dropping the online upsert of item %d: %s", item_id, err)
            journal.forget(item_id, entry.seq)
            if journal.metrics:
                journal.metrics.journal_dropped.inc()


class Watcher:
    """Polls CURRENT and swaps in each newly published bundle that loads and passes smoke."""

    def __init__(self, bundles_dir: Path, holder: ModelHolder, build: Callable[[Path], ServingModel],
                 metrics: Metrics, poll_seconds: float = 2.0, retry_seconds: float = 60.0,
                 on_swap: Callable[[ServingModel], None] | None = None):
        self.bundles_dir, self.holder, self.build = Path(bundles_dir), holder, build
        self.metrics, self.poll_seconds, self.retry_seconds = metrics, poll_seconds, retry_seconds
        self.on_swap = on_swap
        self._failed: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bundle-watcher", daemon=True)

    def start(self) -> None:
        """Start polling (the first check runs immediately)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and wait for a load in progress to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        """Poll until stopped; never dies on an error."""
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any bad bundle
                log.exception("bundle watcher check failed")
            self._stop.wait(self.poll_seconds)

    def check(self) -> bool:
        """Load and swap in the published bundle if it is new; returns whether it swapped."""
        try:
            name = current_version(self.bundles_dir)
        except Exception as err:  # noqa: BLE001 - a garbled CURRENT is a failed reload
            return self._fail("CURRENT", err)
        if name is None or name == self.holder.name:
            return False
        failed_at = self._failed.get(name)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_seconds:
            return False
        start = time.perf_counter()
        try:
            model = self.build(self.bundles_dir / name)
            model.smoke()
            self.holder.swap(model, name)
        except Exception as err:  # noqa: BLE001 - refuse the bundle, keep serving the old one
            return self._fail(name, err)
        self._failed.pop(name, None)
        self.metrics.reloads.labels(result="success").inc()
        log.info("serving bundle %s (loaded in %.2f s)", name, time.perf_counter() - start)
        if self.on_swap:
            self.on_swap(model)
        return True

    def _fail(self, name: str, err: Exception) -> bool:
        """Count and log a refused bundle, remembering when it failed."""
        if name not in self._failed or time.monotonic() - self._failed[name] >= self.retry_seconds:
            self.metrics.reloads.labels(result="failure").inc()
            log.error("refused bundle %s: %s: %s (still serving %s)", name, type(err).__name__, err,
                      self.holder.name or "nothing")
        self._failed[name] = time.monotonic()
        return False


def build_model(path: Path, encoder_threads: int = 1, max_pixels: int | None = None) -> ServingModel:
    """Verify a bundle directory and load it as a ServingModel."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    return ServingModel.from_bundle(load_bundle(path), encoder_threads, **kwargs)
