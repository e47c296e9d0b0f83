"""The SQL event store shared by the SQLite and PostgreSQL backends: one schema, one behaviour.

Table `events` (one row per acknowledged write; columns as `records.Event`, arrays packed as
little-endian int64, image bytes inline) and table `meta` (schema version, compaction mark).
`append` commits before it returns, in one transaction that also numbers the event; numbers are
assigned in commit order (SQLite has one writer; PostgreSQL writers take a transaction-scoped
advisory lock), so a reader that has seen event N has seen every committed event below N. A
client request id is unique: appending it again returns the first event's id with
`duplicate=True` and writes nothing. Reads verify each row's CRC-32: a damaged row is skipped,
logged with its id and reported in `Batch.skipped`, and reading goes on.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import numpy as np

from index.events.records import (DELETE, INTERACTIONS, UPSERT, Batch, Event, StoreDamaged,
                                  StoreError, pack_ids, unpack_ids)

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
COLUMNS = ("id", "kind", "created", "request_id", "item_id", "user_id", "text", "image",
           "item_ids", "stamps", "action", "checksum")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM events"
READ_ROWS = 500                 # rows per read
READ_BYTES = 64 * 1024 * 1024   # payload bytes per read (at least one row)


class SQLStore:
    """Event store over a DB-API connection; subclasses supply the dialect."""

    placeholder = "?"
    blob_type = "BLOB"
    id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"
    real_type = "REAL"

    def __init__(self, display: str):
        self.display = display
        self._lock = threading.RLock()
        self._conn = None

    # -- dialect hooks -------------------------------------------------------------------------
    def _connect(self):
        """A new DB-API connection in autocommit mode."""
        raise NotImplementedError

    def _begin_write(self, cur) -> None:
        """Start a write transaction that serialises writers."""
        raise NotImplementedError

    def _commit(self, cur) -> None:
        """Commit the write transaction."""
        cur.execute("COMMIT")

    def _rollback(self, cur) -> None:
        """Abandon the write transaction."""
        cur.execute("ROLLBACK")

    def _classify(self, err: Exception) -> StoreError | None:
        """The StoreError a driver exception means, or None to re-raise it as is."""
        raise NotImplementedError

    def _after_error(self) -> None:
        """Called (lock held) after a classified failure, e.g. to drop a broken connection."""

    def _announce(self, cur, event_id: int) -> None:
        """Tell other processes about a new event, inside its write transaction (none here)."""

    def listener(self):
        """A connection that wakes on other processes' commits, or None: poll only (SQLite)."""
        return None

    def disk_bytes(self) -> int:
        """Bytes the store occupies on disk."""
        raise NotImplementedError

    # -- plumbing ------------------------------------------------------------------------------
    def _sql(self, text: str) -> str:
        """Statement text with this driver's placeholder."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _ddl(self) -> list[str]:
        """CREATE statements of the schema (idempotent)."""
        return [
            f"CREATE TABLE IF NOT EXISTS events (id {self.id_column}, kind TEXT NOT NULL, "
            f"created {self.real_type} NOT NULL, request_id TEXT UNIQUE, item_id BIGINT, "
            f"user_id BIGINT, text TEXT, image {self.blob_type}, item_ids {self.blob_type}, "
            f"stamps {self.blob_type}, action TEXT, checksum BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS events_item ON events (item_id, id)",
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ]

    def _drop_connection(self) -> None:
        """Forget a connection that failed, so the next call reconnects."""
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        self._conn = None

    @contextlib.contextmanager
    def _cursor(self, write: bool = False) -> Iterator:
        """A cursor under the store lock (in a write transaction if asked), errors classified."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                cur = self._conn.cursor()
                if write:
                    self._begin_write(cur)
                    try:
                        yield cur
                        self._commit(cur)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            self._rollback(cur)
                        raise
                else:
                    yield cur
            except StoreError:
                raise
            except Exception as err:  # noqa: BLE001 - classified, or re-raised untouched
                mapped = self._classify(err)
                if mapped is None:
                    raise
                self._after_error()
                raise mapped from err

    def create(self) -> None:
        """Create the schema if needed and check its version."""
        with self._cursor(write=True) as cur:
            for statement in self._ddl():
                cur.execute(statement)
            cur.execute(self._sql("SELECT value FROM meta WHERE key = ?"), ("schema_version",))
            row = cur.fetchone()
            if row is None:
                cur.execute(self._sql("INSERT INTO meta (key, value) VALUES (?, ?)"),
                            ("schema_version", SCHEMA_VERSION))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(f"{self.display}: schema version {row[0]}, this code reads "
                                 f"{SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._drop_connection()

    # -- writes --------------------------------------------------------------------------------
    def append(self, event: Event) -> tuple[int, bool]:
        """Commit one event; returns (its id, whether its request id was already stored)."""
        stamped = Event(**{**event.__dict__, "created": time.time(), "id": 0})
        row = (stamped.kind, stamped.created, stamped.request_id, stamped.item_id,
               stamped.user_id, stamped.text, stamped.image, pack_ids(stamped.item_ids),
               pack_ids(stamped.timestamps), stamped.action, stamped.checksum())
        with self._cursor(write=True) as cur:
            cur.execute(self._sql(
                "INSERT INTO events (kind, created, request_id, item_id, user_id, text, image, "
                "item_ids, stamps, action, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING RETURNING id"), row)
            got = cur.fetchone()
            if got is not None:
                self._announce(cur, int(got[0]))
                return int(got[0]), False
            cur.execute(self._sql("SELECT id FROM events WHERE request_id = ?"),
                        (stamped.request_id,))
            return int(cur.fetchone()[0]), True

    def set_meta(self, key: str, value: str) -> None:
        """Store one meta value."""
        with self._cursor(write=True) as cur:
            cur.execute(self._sql("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                                  "DO UPDATE SET value = excluded.value"), (key, value))

    def meta(self, key: str, default: str | None = None) -> str | None:
        """One meta value."""
        with self._cursor() as cur:
            cur.execute(self._sql("SELECT value FROM meta WHERE key = ?"), (key,))
            row = cur.fetchone()
        return default if row is None else row[0]

    # -- reads ---------------------------------------------------------------------------------
    def head(self) -> int:
        """Id of the newest stored event (0 when empty)."""
        with self._cursor() as cur:
            cur.execute("SELECT MAX(id) FROM events")
            row = cur.fetchone()
        return int(row[0] or 0)

    def lookup(self, request_id: str) -> int | None:
        """Id of the event stored with this client request id, if any."""
        with self._cursor() as cur:
            cur.execute(self._sql("SELECT id FROM events WHERE request_id = ?"), (request_id,))
            row = cur.fetchone()
        return None if row is None else int(row[0])

    def read(self, after: int, through: int | None = None, limit: int = READ_ROWS) -> Batch:
        """Events with after < id <= through in id order (one bounded page; page on last_id)."""
        bound = 2 ** 62 if through is None else through
        with self._cursor() as cur:
            cur.execute(self._sql(
                "SELECT id, COALESCE(length(image), 0) + COALESCE(length(item_ids), 0) FROM events "
                "WHERE id > ? AND id <= ? ORDER BY id LIMIT ?"), (after, bound, limit))
            sizes = cur.fetchall()
        if not sizes:
            return Batch([], [], after)
        total, last = 0, int(sizes[0][0])
        for event_id, size in sizes:
            if total and total + int(size) > READ_BYTES:
                break
            total, last = total + int(size), int(event_id)
        return self._range(after, last)

    def get(self, ids: list[int]) -> Batch:
        """The events with these ids (missing ones are left out; unreadable ones skipped)."""
        events, skipped = [], []
        for event_id in sorted(set(ids)):
            try:
                batch = self._decode_rows(self._fetch(f"{_SELECT} WHERE id = ?", (event_id,)))
            except StoreDamaged as err:
                log.error("event store %s: cannot read event %d (%s); skipping it",
                          self.display, event_id, err)
                batch = Batch([], [event_id], event_id)
            events += batch.events
            skipped += batch.skipped
        return Batch(events, skipped, max(ids, default=0))

    def _range(self, after: int, last: int) -> Batch:
        """Events in (after, last], row by row when the bulk read hits damage."""
        try:
            rows = self._fetch(f"{_SELECT} WHERE id > ? AND id <= ? ORDER BY id", (after, last))
        except StoreDamaged as err:
            log.error("event store %s: reading events %d..%d failed (%s); reading them one by "
                      "one", self.display, after + 1, last, err)
            ids = [int(r[0]) for r in self._fetch(
                "SELECT id FROM events WHERE id > ? AND id <= ? ORDER BY id", (after, last))]
            batch = self.get(ids)
        else:
            batch = self._decode_rows(rows)
        batch.last_id = last
        return batch

    def _fetch(self, query: str, params: tuple) -> list[tuple]:
        """All rows of one read query."""
        with self._cursor() as cur:
            cur.execute(self._sql(query), params)
            return cur.fetchall()

    def _decode_rows(self, rows: list[tuple]) -> Batch:
        """Decode rows, skipping (and logging) those that fail their checksum."""
        events, skipped = [], []
        for row in rows:
            event = decode(row)
            if event is None:
                log.error("event store %s: event %d fails its checksum (damaged or torn "
                          "record); skipping it", self.display, row[0])
                skipped.append(int(row[0]))
            else:
                events.append(event)
        last = max([e.id for e in events] + skipped, default=0)
        return Batch(events, skipped, last)

    def latest_item_events(self, through: int) -> list[tuple[int, int, str]]:
        """(item id, event id, kind) of the newest upsert/delete per item with id <= through."""
        with self._cursor() as cur:
            cur.execute(self._sql(
                "SELECT e.item_id, e.id, e.kind FROM events e JOIN (SELECT item_id, MAX(id) AS m "
                "FROM events WHERE id <= ? AND kind IN (?, ?) GROUP BY item_id) last "
                "ON e.id = last.m ORDER BY e.id"), (through, UPSERT, DELETE))
            return [(int(i), int(e), k) for i, e, k in cur.fetchall()]

    def stats(self) -> dict:
        """Counts per kind, id range, interactions, compaction mark and disk use."""
        with self._cursor() as cur:
            cur.execute("SELECT kind, COUNT(*), MIN(id), MAX(id), "
                        "SUM(COALESCE(length(image), 0)) FROM events GROUP BY kind")
            kinds = {k: {"events": int(n), "first": int(a), "last": int(b),
                         "image_bytes": int(s or 0)} for k, n, a, b, s in cur.fetchall()}
            cur.execute(self._sql("SELECT COUNT(DISTINCT user_id), "
                                  "SUM(COALESCE(length(item_ids), 0)) FROM events WHERE kind = ?"),
                        (INTERACTIONS,))
            users, packed = cur.fetchone()
        return {"store": self.display, "head": self.head(), "kinds": kinds,
                "users": int(users or 0), "interactions": int(packed or 0) // 8,
                "compacted_through": int(self.meta("compacted_through", "0")),
                "disk_bytes": self.disk_bytes()}

    # -- compaction ----------------------------------------------------------------------------
    def compact(self, through: int, bundle_items: np.ndarray) -> int:
        """Delete events with id <= through, except the newest upsert of each item that
        `bundle_items` lacks (the server still replays those); returns how many went."""
        held = set(np.asarray(bundle_items, dtype=np.int64).tolist())
        keep = {e for item, e, kind in self.latest_item_events(through)
                if kind == UPSERT and item not in held}
        with self._cursor() as cur:
            cur.execute(self._sql("SELECT id FROM events WHERE id <= ? ORDER BY id"), (through,))
            doomed = [int(r[0]) for r in cur.fetchall() if int(r[0]) not in keep]
        for start in range(0, len(doomed), 500):
            with self._cursor(write=True) as cur:
                cur.executemany(self._sql("DELETE FROM events WHERE id = ?"),
                                [(i,) for i in doomed[start:start + 500]])
        previous = int(self.meta("compacted_through", "0"))
        self.set_meta("compacted_through", str(max(previous, through)))
        return len(doomed)


def decode(row: tuple) -> Event | None:
    """The Event of a row, or None when its checksum does not match (damaged row)."""
    (event_id, kind, created, request_id, item_id, user_id, text, image, item_ids, stamps,
     action, checksum) = row
    try:
        event = Event(kind=kind, id=int(event_id), created=float(created), request_id=request_id,
                      item_id=None if item_id is None else int(item_id),
                      user_id=None if user_id is None else int(user_id), text=text or "",
                      image=bytes(image or b""), item_ids=unpack_ids(item_ids),
                      timestamps=unpack_ids(stamps), action=action or "")
    except (ValueError, TypeError, UnicodeError):
        return None
    return event if event.checksum() == int(checksum) else None
