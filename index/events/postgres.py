"""The shared event store: PostgreSQL through psycopg 3, same schema and behaviour as SQLite.

Writers serialise on a transaction-scoped advisory lock before the insert takes its id, so ids
are assigned in commit order and a poller that has read up to N never misses a later commit with
a smaller id. Commits are durable under PostgreSQL's defaults (`fsync=on`,
`synchronous_commit=on`). A connection that fails is dropped and the next call reconnects, so a
database restart costs the writes made while it was down (answered UNAVAILABLE), nothing else.
"""
from __future__ import annotations

import re

from index.events.records import StoreDamaged, StoreError, StoreFull, StoreUnavailable
from index.events.store import SQLStore

WRITE_LOCK = 0x7074_6D72  # "ptmr": the advisory lock key of event writers
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 15_000


def redact(url: str) -> str:
    """The URL without its password, for logs and GetModelInfo."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class PostgresStore(SQLStore):
    """Event store in a PostgreSQL database."""

    placeholder = "%s"
    blob_type = "BYTEA"
    id_column = "BIGSERIAL PRIMARY KEY"
    real_type = "DOUBLE PRECISION"

    def __init__(self, url: str):
        self.url = url
        super().__init__(redact(url))

    def _connect(self):
        """Autocommit connection with statement and lock timeouts (added to the URL's options)."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(self.url).get("options") or ""
        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
            options=f"{given} -c statement_timeout={STATEMENT_TIMEOUT_MS} "
                    f"-c lock_timeout={STATEMENT_TIMEOUT_MS}".strip())

    def _begin_write(self, cur) -> None:
        """Open a transaction and wait for the writers' advisory lock."""
        cur.execute("BEGIN")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))

    def _classify(self, err: Exception) -> StoreError | None:
        """Class 53 (insufficient resources): full; connection and timeout errors: unavailable."""
        import psycopg

        if not isinstance(err, psycopg.Error):
            return None
        state = getattr(err, "sqlstate", None) or ""
        if state.startswith("53") and state != "53300":
            return StoreFull(f"{self.display}: {err}")
        if state == "XX001":
            return StoreDamaged(f"{self.display}: {err}")
        if isinstance(err, (psycopg.OperationalError, psycopg.InterfaceError)):
            return StoreUnavailable(f"{self.display}: {str(err).strip()}")
        return None

    def _after_error(self) -> None:
        """Reconnect on the next call: the connection may be broken."""
        self._drop_connection()

    def disk_bytes(self) -> int:
        """Bytes of the events and meta tables with their indexes and TOAST data."""
        with self._cursor() as cur:
            cur.execute("SELECT pg_total_relation_size('events') + pg_total_relation_size('meta')")
            return int(cur.fetchone()[0])

    def vacuum(self) -> None:
        """Return the space of deleted rows to the tables (after a compaction)."""
        with self._cursor() as cur:
            cur.execute("VACUUM events")
