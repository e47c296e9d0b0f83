"""The embedded event store: one SQLite file in WAL mode with synchronous=FULL.

WAL with `synchronous=FULL` fsyncs the log at every commit, so a committed event survives a crash
and a power cut (with NORMAL, WAL mode may lose the last commits on power loss). One writer at a
time (`BEGIN IMMEDIATE`, waiting up to `busy_timeout` for another process's write); readers never
block it. Several processes on one machine may share the file.
"""
from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from index.events.records import StoreDamaged, StoreError, StoreFull, StoreUnavailable
from index.events.store import SQLStore

FILE_NAME = "events.sqlite3"
BUSY_MS = 10_000
_FULL, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _CANTOPEN, _NOTADB = 13, 5, 6, 8, 10, 11, 14, 26


class SQLiteStore(SQLStore):
    """Event store in one SQLite file (or ":memory:" for tests)."""

    def __init__(self, path: str | Path, max_pages: int | None = None):
        self.path = str(path)
        self.max_pages = max_pages
        super().__init__(f"sqlite:{self.path}")

    def _connect(self) -> sqlite3.Connection:
        """Autocommit connection with WAL, synchronous=FULL and a busy timeout."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_MS / 1000)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        if self.max_pages:
            conn.execute(f"PRAGMA max_page_count={int(self.max_pages)}")
        return conn

    def _begin_write(self, cur) -> None:
        """Take the write lock now, not at the first write."""
        cur.execute("BEGIN IMMEDIATE")

    def _classify(self, err: Exception) -> StoreError | None:
        """SQLITE_FULL and ENOSPC: full; busy, I/O, read-only: unavailable; corrupt: damaged."""
        if isinstance(err, OSError):
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                return StoreFull(f"{self.display}: {err}")
            return StoreUnavailable(f"{self.display}: {err}")
        if not isinstance(err, sqlite3.Error):
            return None
        code = (getattr(err, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _FULL:
            return StoreFull(f"{self.display}: {err}")
        if code in (_CORRUPT, _NOTADB):
            return StoreDamaged(f"{self.display}: {err}")
        if code in (_BUSY, _LOCKED, _READONLY, _IOERR, _CANTOPEN) or isinstance(
                err, sqlite3.OperationalError):
            return StoreUnavailable(f"{self.display}: {err}")
        return StoreDamaged(f"{self.display}: {err}")

    def disk_bytes(self) -> int:
        """Bytes of the database file, its WAL and its shared-memory index."""
        if self.path == ":memory:":
            return 0
        return sum(Path(self.path + suffix).stat().st_size for suffix in ("", "-wal", "-shm")
                   if Path(self.path + suffix).exists())

    def vacuum(self) -> None:
        """Checkpoint the WAL and rewrite the file without free pages (after a compaction)."""
        with self._cursor() as cur:
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cur.execute("VACUUM")
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
