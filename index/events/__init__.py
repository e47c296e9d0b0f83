"""The event store: durable online writes shared by every server process and the retraining job.

A second contract between online and offline, like the bundle (torch-free, imports nothing from
serve/, export/ or train/). `open_store(url)` returns a store over SQLite (a path, or
`sqlite:PATH`) or PostgreSQL (`postgresql://...`) with the schema created; see `store.SQLStore`
for the guarantees and docs/events.md for the whole picture.
"""
from __future__ import annotations

from pathlib import Path

from index.events.records import (DEFAULT_ACTION, DELETE, INTERACTIONS, UPSERT, Batch, Event,
                                  StoreDamaged, StoreError, StoreFull, StoreUnavailable, delete,
                                  interactions, upsert)
from index.events.sqlite import FILE_NAME, SQLiteStore
from index.events.store import SQLStore

__all__ = [
    "DEFAULT_ACTION", "DELETE", "FILE_NAME", "INTERACTIONS", "UPSERT", "Batch", "Event",
    "SQLStore", "SQLiteStore", "StoreDamaged", "StoreError", "StoreFull", "StoreUnavailable",
    "delete", "interactions", "is_postgres", "open_store", "upsert",
]


def is_postgres(url: str | Path) -> bool:
    """Whether a store URL names a PostgreSQL database."""
    return str(url).startswith(("postgresql://", "postgres://"))


def open_store(url: str | Path, create: bool = True) -> SQLStore:
    """The store a URL names: postgresql://..., sqlite:PATH, a .sqlite3 file or a state folder."""
    text = str(url)
    if is_postgres(text):
        from index.events.postgres import PostgresStore

        store: SQLStore = PostgresStore(text)
    else:
        path = Path(text[len("sqlite:"):] if text.startswith("sqlite:") else text)
        if text != ":memory:" and (path.is_dir() or not path.suffix):
            path = path / FILE_NAME
        store = SQLiteStore(path)
    if create:
        store.create()
    return store
