"""Hot reload and durable online writes: the model holder and the bundle watcher thread.

The holder owns one reference, `holder.model`; the servicer reads it once per request, so a swap
never changes the model under a running request (in-flight requests finish on the old one, which
is freed when the last of them drops it).

Writes (UpsertItem, DeleteItem, RecordInteractions) are validated and encoded first, then
committed to the event store (index.events) and only then applied to the live model, all under
the mutation lock: an OK answer means the event is durable, and a store that cannot take it
(database down, disk full) answers UNAVAILABLE / RESOURCE_EXHAUSTED with nothing applied, while
reads keep serving. Events are applied to a model strictly in store order: a write first applies
any other writer's events below its own id (read back from the store), and `catch_up` (called by
the serve.online.Poller every `--poll-seconds`) applies the rest, so every process on one store
converges on the same state. A client request id seen before is answered as a duplicate after
catching up to its event, without writing again.

The watcher polls `bundles/CURRENT` every `poll_seconds`. When it names a new version it loads
the bundle (`index.bundle.load_bundle` verifies every sha256), builds the `ServingModel`, runs a
smoke query, replays the store onto it and swaps, all off the request path. Replay applies every
event after the bundle's `event_watermark` (upserts re-encoded with the new encoder), plus the
latest upsert of any item the watermark covers but the bundle lacks (the retrain left it out:
logged, never silently lost); the events written while the replay ran are applied under the
mutation lock just before the swap. A bundle that fails to load or smoke is refused and logged,
`recsys_reloads_total{result="failure"}` counts it, the old model keeps serving, and the same
version is retried only after `retry_seconds` (or as soon as CURRENT names another version). A
store that cannot be read postpones the swap to the next poll. Publishing an older version rolls
back the same way.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index import events as ev
from index.bundle import current_version, load_bundle
from index.events import Batch, Event, SQLStore, StoreError
from serve.errors import AlreadyExists, InvalidArgument, NotFound, ServeError, Unavailable
from serve.encoding import EncodePool
from serve.errors import refused_write
from serve.metrics import Metrics
from serve.model import ServingModel
from serve.online import FoldIn, apply_event
from serve.polling import PollLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """The outcome of one acknowledged write."""

    model: ServingModel
    event_id: int
    duplicate: bool = False
    replaced: bool = False


class ModelHolder:
    """The live model reference, the mutation lock and the event store."""

    def __init__(self, store: SQLStore, metrics: Metrics | None = None,
                 encodes: EncodePool | None = None):
        self.model: ServingModel | None = None
        self.name: str | None = None
        self.store, self.metrics = store, metrics or Metrics()
        self.encodes = encodes or EncodePool()
        self.mutation_lock = threading.Lock()
        self.followers: tuple[ModelHolder, ...] = ()  # experiment arms on the same store
        self.starting: Callable[[], str | None] = lambda: None  # why not loaded yet, if known

    def encode(self, model: ServingModel, image: bytes, text: str) -> np.ndarray:
        """A request's item vector, encoded on the bounded encode pool (serve.encoding)."""
        return self.encodes.run(self._timed_encode, model, image, text)

    def _timed_encode(self, model: ServingModel, image: bytes, text: str) -> np.ndarray:
        """model.encode, timed in recsys_encode_duration_seconds."""
        with self.metrics.encode_duration.time():
            return model.encode(image, text)

    def require(self) -> ServingModel:
        """The live model, or Unavailable before the first bundle is loaded."""
        model = self.model
        if model is None:
            reason = self.starting()
            raise Unavailable("no bundle is loaded yet" + (f" ({reason})" if reason else ""))
        return model

    # -- writes --------------------------------------------------------------------------------
    def upsert(self, item_id: int, image: bytes, text: str, overwrite: bool,
               request_id: str = "") -> Written:
        """Encode (outside the lock), commit and insert an item."""
        done = self._already(request_id)
        if done is not None:
            return done
        for _ in range(3):
            model = self.require()
            if not overwrite and model.has_item(item_id):
                raise AlreadyExists(f"item {item_id} is already in the index; set overwrite")
            vec = self.encode(model, image, text)
            with self.mutation_lock:
                if self.model is not model:
                    continue  # swapped while encoding: encode again with the new model
                present = model.has_item(item_id)
                if present and not overwrite:
                    raise AlreadyExists(f"item {item_id} is already in the index; set overwrite")
                event_id, dup = self._commit(model, ev.upsert(item_id, image, text, request_id),
                                             vec)
            self._follow(event_id)
            return Written(model, event_id, dup, present and not dup)
        raise Unavailable("the bundle changed three times during this upsert; retry")

    def delete(self, item_id: int, request_id: str = "") -> Written:
        """Commit a delete and remove the item from the live index."""
        done = self._already(request_id)
        if done is not None:
            return done
        with self.mutation_lock:
            model = self.require()
            if not model.has_item(item_id):
                raise NotFound(f"item {item_id} is not in the index")
            event_id, dup = self._commit(model, ev.delete(item_id, request_id))
        self._follow(event_id)
        return Written(model, event_id, dup)

    def record(self, user_id: int, item_ids: np.ndarray, timestamps: np.ndarray, action: str,
               request_id: str = "") -> Written:
        """Commit a user's interactions (items must be in the index) and apply them."""
        done = self._already(request_id)
        if done is not None:
            return done
        if self._unknown(self.require(), item_ids):
            self._caught_up()  # another process may have just upserted them
        with self.mutation_lock:
            model = self.require()
            unknown = self._unknown(model, item_ids)
            if unknown:
                raise InvalidArgument(f"item_ids not in the index: {unknown[:10]}")
            event = ev.interactions(user_id, item_ids, timestamps, action, request_id)
            event_id, dup = self._commit(model, event)
        self._follow(event_id)
        return Written(model, event_id, dup)

    @staticmethod
    def _unknown(model: ServingModel, item_ids: np.ndarray) -> list[int]:
        """The ids among item_ids that are not live in the model's index."""
        return [i for i in np.unique(item_ids).tolist() if not model.has_item(i)]

    def _already(self, request_id: str) -> Written | None:
        """For a request id the store holds: catch up to its event and answer a duplicate."""
        if not request_id:
            return None
        try:
            event_id = self.store.lookup(request_id)
        except StoreError as err:
            raise self._refused("read", err) from err
        if event_id is None:
            return None
        self._caught_up(event_id)
        return Written(self.require(), event_id, duplicate=True)

    def _commit(self, model: ServingModel, event: Event,
                vector: np.ndarray | None = None) -> tuple[int, bool]:
        """Append an event (lock held), then apply the store up to it; returns (id, duplicate)."""
        try:
            event_id, dup = self.store.append(event)
        except StoreError as err:
            raise self._refused("write", err) from err
        try:
            if not dup and event_id == model.position + 1:
                self._apply(model, Event(**{**event.__dict__, "id": event_id}), vector)
                model.position = event_id
            else:
                self._advance(model, event_id, {event_id: vector} if vector is not None else {})
        except StoreError as err:  # durable already: the poller applies it once it can read
            log.warning("event %d is committed but could not be applied yet: %s", event_id, err)
        self._report(model)
        return event_id, dup

    def _follow(self, through: int) -> None:
        """Apply the store through an acknowledged write to every experiment arm's model too
        (a failure there is left to the next poll: the write is durable already)."""
        for follower in self.followers:
            try:
                follower.catch_up(through)
            except StoreError as err:
                log.warning("experiment arm %s could not apply event %d yet: %s",
                            follower.name, through, err)

    def _refused(self, op: str, err: StoreError) -> ServeError:
        """Count a store failure and turn it into the status to answer."""
        self.metrics.store_errors.labels(op=op).inc()
        log.warning("event store %s failed: %s", op, err)
        return refused_write(err)

    # -- applying the store ----------------------------------------------------------------------
    def catch_up(self, through: int | None = None) -> int:
        """Apply the store's events after the live model's position (encoding outside the lock);
        returns how many were applied."""
        model = self.model
        if model is None:
            return 0
        target = self.store.head() if through is None else through
        self.metrics.store_head.set(max(target, model.position))
        applied = 0
        while model.position < target:
            batch = self.store.read(model.position, target)
            vectors = self._encode(model, batch.events)
            with self.mutation_lock:
                if self.model is not model:
                    return applied
                if not (batch.events or batch.skipped):
                    model.position = max(model.position, target)  # ids never used
                    break
                applied += self._apply_batch(model, batch, vectors)
        self._report(model)
        for follower in self.followers if through is None else ():
            applied += follower.catch_up(target)
        return applied

    def _caught_up(self, through: int | None = None) -> None:
        """catch_up for a request: a store failure becomes the status to answer."""
        try:
            self.catch_up(through)
        except StoreError as err:
            raise self._refused("read", err) from err

    def _advance(self, model: ServingModel, through: int, vectors: dict) -> None:
        """Apply events (position, through] to a model whose updates this thread owns."""
        while model.position < through:
            batch = self.store.read(model.position, through)
            if not (batch.events or batch.skipped):
                model.position = through
                break
            self._apply_batch(model, batch, vectors)

    def _encode(self, model: ServingModel, events: list[Event]) -> dict[int, np.ndarray]:
        """Vectors of the upserts among events (failures are left for _apply to report)."""
        vectors = {}
        for event in events:
            if event.kind == ev.UPSERT and event.id > model.position:
                try:
                    vectors[event.id] = model.encode(event.image, event.text)
                except ServeError:
                    continue
        return vectors

    def _apply_batch(self, model: ServingModel, batch: Batch, vectors: dict) -> int:
        """Apply a batch's events past the model's position; advance the position."""
        applied = 0
        for event in batch.events:
            if event.id > model.position:
                self._apply(model, event, vectors.get(event.id))
                applied += 1
        if batch.skipped:
            self.metrics.store_skipped.labels(reason="damaged").inc(
                sum(1 for i in batch.skipped if i > model.position))
        model.position = max(model.position, batch.last_id)
        return applied

    def _apply(self, model: ServingModel, event: Event, vector: np.ndarray | None) -> None:
        """Apply one event; an upsert that cannot be encoded is skipped, logged and counted."""
        try:
            apply_event(model, event, vector)
        except ServeError as err:
            log.warning("skipping event %d (%s of item %s) on bundle v%d: %s", event.id,
                        event.kind, event.item_id, model.version, err)
            self.metrics.store_skipped.labels(reason="unencodable").inc()
            return
        self.metrics.online_events.labels(kind=event.kind).inc()

    def swap(self, model: ServingModel, name: str) -> None:
        """Replay the store onto a smoke-tested model and make it live."""
        start = time.perf_counter()
        self._restore_missing(model)
        head = self.store.head()
        if head < model.watermark:
            log.warning("the event store %s ends at event %d, before bundle v%d's watermark %d: "
                        "is it the store the bundle was trained from?", self.store.display, head,
                        model.version, model.watermark)
        self._advance(model, head, {})
        with self.mutation_lock:
            self._advance(model, self.store.head(), {})
            self.model, self.name = model, name
        log.info("bundle v%d: applied store events %d..%d in %.2f s", model.version,
                 model.watermark + 1, model.position, time.perf_counter() - start)
        self._report(model)

    def _restore_missing(self, model: ServingModel) -> None:
        """Re-insert items whose upsert the watermark covers but that the bundle lacks."""
        if model.watermark == 0:
            return
        ids = [e for item, e, kind in self.store.latest_item_events(model.watermark)
               if kind == ev.UPSERT and not model.has_item(item)]
        for event in self.store.get(ids).events:
            log.warning("item %d (upserted online, event %d) is not in bundle v%d although its "
                        "watermark %d covers it; re-encoding it", event.item_id, event.id,
                        model.version, model.watermark)
            self._apply(model, event, None)

    def _report(self, model: ServingModel) -> None:
        """Export the live model's gauges."""
        if model is self.model:
            self.metrics.loaded(model)


class Watcher(PollLoop):
    """Polls CURRENT and swaps in each newly published bundle that loads and passes smoke."""

    def __init__(self, bundles_dir: Path, holder: ModelHolder, build: Callable[[Path], ServingModel],
                 metrics: Metrics, poll_seconds: float = 2.0, retry_seconds: float = 60.0,
                 on_swap: Callable[[ServingModel], None] | None = None):
        super().__init__("bundle-watcher", poll_seconds)
        self.bundles_dir, self.holder, self.build = Path(bundles_dir), holder, build
        self.metrics, self.retry_seconds = metrics, retry_seconds
        self.on_swap = on_swap
        self._failed: dict[str, float] = {}
        self._waiting: tuple[str, ServingModel] | None = None  # loaded, store not readable yet

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
            model = self._load(name)
            self.holder.swap(model, name)
        except StoreError as err:  # not the bundle's fault: keep it loaded, retry next poll
            log.warning("cannot replay the event store onto bundle %s yet (%s); still serving "
                        "%s", name, err, self.holder.name or "nothing")
            return False
        except Exception as err:  # noqa: BLE001 - refuse the bundle, keep serving the old one
            self._waiting = None
            return self._fail(name, err)
        self._waiting = None
        self._failed.pop(name, None)
        self.metrics.reloads.labels(result="success").inc()
        log.info("serving bundle %s (loaded in %.2f s)", name, time.perf_counter() - start)
        if self.on_swap:
            self.on_swap(model)
        return True

    def _load(self, name: str) -> ServingModel:
        """The verified, smoke-tested model of a bundle (kept while the store is unreadable)."""
        if self._waiting is not None and self._waiting[0] == name:
            return self._waiting[1]
        model = self.build(self.bundles_dir / name)
        model.smoke()
        self._waiting = (name, model)
        return model

    def _fail(self, name: str, err: Exception) -> bool:
        """Count and log a refused bundle, remembering when it failed."""
        if name not in self._failed or time.monotonic() - self._failed[name] >= self.retry_seconds:
            self.metrics.reloads.labels(result="failure").inc()
            log.error("refused bundle %s: %s: %s (still serving %s)", name, type(err).__name__, err,
                      self.holder.name or "nothing")
        self._failed[name] = time.monotonic()
        return False


def build_model(path: Path, encoder_threads: int = 1, max_pixels: int | None = None,
                fold_in: FoldIn | None = None, max_aspect: float | None = None) -> ServingModel:
    """Verify a bundle directory and load it as a ServingModel."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    if max_aspect is not None:
        kwargs["max_aspect"] = max_aspect
    return ServingModel.from_bundle(load_bundle(path), encoder_threads, fold_in=fold_in, **kwargs)
