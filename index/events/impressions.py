"""Impressions of online experiments: what an arm showed to a user, in the event store.

Table `impressions` next to `events` in the same database (SQLite or PostgreSQL), created on
first use: one row per logged Recommend answer with the request's impression id, the
experiment, the arm, the user, the bundle version, the server time and the returned item ids in
rank order (packed little-endian int64; position = index in the array). Impressions are not
events: they are never replayed onto a model and do not move the store's head; they are written
in batches off the request thread (serve.impressions), so one write carries many rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.events.records import INTERACTIONS, Event, pack_ids, unpack_ids
from index.events.store import _SELECT, SQLStore, decode


@dataclass(frozen=True)
class Impression:
    """One shown list."""

    impression_id: str
    experiment: str
    arm: str
    user_id: int
    model_version: int
    created: float           # Unix seconds (server clock)
    item_ids: np.ndarray     # (n,) int64, rank order


def _ddl(store: SQLStore) -> list[str]:
    """CREATE statements (idempotent)."""
    return [
        f"CREATE TABLE IF NOT EXISTS impressions (id {store.id_column}, impression_id TEXT NOT "
        f"NULL, experiment TEXT NOT NULL, arm TEXT NOT NULL, user_id BIGINT NOT NULL, "
        f"model_version BIGINT NOT NULL, created {store.real_type} NOT NULL, "
        f"item_ids {store.blob_type} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS impressions_experiment ON impressions (experiment, user_id)",
    ]


def ensure_schema(store: SQLStore) -> None:
    """Create the impressions table if needed."""
    with store._cursor(write=True) as cur:
        for statement in _ddl(store):
            cur.execute(statement)


def append(store: SQLStore, rows: list[Impression]) -> None:
    """Commit a batch of impressions in one transaction."""
    if not rows:
        return
    with store._cursor(write=True) as cur:
        cur.executemany(store._sql(
            "INSERT INTO impressions (impression_id, experiment, arm, user_id, model_version, "
            "created, item_ids) VALUES (?, ?, ?, ?, ?, ?, ?)"),
            [(r.impression_id, r.experiment, r.arm, int(r.user_id), int(r.model_version),
              float(r.created), pack_ids(r.item_ids)) for r in rows])


def read(store: SQLStore, experiment: str) -> list[Impression]:
    """Every impression of an experiment, oldest first."""
    ensure_schema(store)
    rows = store._fetch(
        "SELECT impression_id, experiment, arm, user_id, model_version, created, item_ids FROM "
        "impressions WHERE experiment = ? ORDER BY created, id", (experiment,))
    return [Impression(i, e, a, int(u), int(v), float(c), unpack_ids(ids))
            for i, e, a, u, v, c, ids in rows]


def time_range(store: SQLStore, experiment: str) -> tuple[float, float] | None:
    """(first, last) impression time of an experiment, or None without impressions."""
    ensure_schema(store)
    rows = store._fetch("SELECT MIN(created), MAX(created) FROM impressions WHERE "
                        "experiment = ?", (experiment,))
    first, last = rows[0]
    return None if first is None else (float(first), float(last))


def interactions_since(store: SQLStore, since: float) -> list[Event]:
    """Interactions events committed at or after `since` (server time), in id order; rows that
    fail their checksum are left out."""
    rows = store._fetch(f"{_SELECT} WHERE kind = ? AND created >= ? ORDER BY id",
                        (INTERACTIONS, since))
    return [e for e in (decode(r) for r in rows) if e is not None]
