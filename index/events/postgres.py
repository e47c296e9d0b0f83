"""The shared event store: PostgreSQL through psycopg 3, same schema and behaviour as SQLite.

Writers serialise on a transaction-scoped advisory lock before the insert takes its id, so ids
are assigned in commit order and a poller that has read up to N never misses a later commit with
a smaller id. Commits are durable under PostgreSQL's defaults (`fsync=on`,
`synchronous_commit=on`). A connection that fails is dropped and the next call reconnects, so a
database restart costs the writes made while it was down (answered UNAVAILABLE), nothing else.

Every append also sends `NOTIFY ptmrec_events, '<id>'` inside its transaction, so it is delivered
when (and only if) the event commits; `listener()` opens a dedicated LISTEN connection that
servers wait on to apply other processes' writes at once instead of at the next poll.
"""
from __future__ import annotations

import contextlib
import re

from index.events.records import StoreDamaged, StoreError, StoreFull, StoreUnavailable
from index.events.store import SQLStore

WRITE_LOCK = 0x7074_6D72  # "ptmr": the advisory lock key of event writers
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 15_000
CHANNEL = "ptmrec_events"  # NOTIFY channel of committed events (payload: the event id)
LISTEN_APP = "ptmrec-listen"  # application_name of LISTEN connections (pg_stat_activity)
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
             "keepalives_count": 3}  # an idle LISTEN connection to a vanished host dies in ~1 min


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

    def _announce(self, cur, event_id: int) -> None:
        """NOTIFY the event's id; PostgreSQL delivers it only if the transaction commits."""
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(event_id)))

    def listener(self) -> Listener:
        """A new (not yet connected) LISTEN connection on this store's database."""
        return Listener(self.url, self.display)

    def disk_bytes(self) -> int:
        """Bytes of the events and meta tables with their indexes and TOAST data."""
        with self._cursor() as cur:
            cur.execute("SELECT pg_total_relation_size('events') + pg_total_relation_size('meta')")
            return int(cur.fetchone()[0])

    def vacuum(self) -> None:
        """Return the space of deleted rows to the tables (after a compaction)."""
        with self._cursor() as cur:
            cur.execute("VACUUM events")


class Listener:
    """One LISTEN connection: `connect()`, then `wait(timeout)` for committed events' ids."""

    def __init__(self, url: str, display: str):
        self.url, self.display = url, display
        self._conn = None

    def connect(self) -> None:
        """Open the connection and LISTEN (StoreUnavailable when the database cannot be reached)."""
        import psycopg

        self.close()
        try:
            self._conn = psycopg.connect(self.url, autocommit=True, application_name=LISTEN_APP,
                                         connect_timeout=CONNECT_TIMEOUT_S, **KEEPALIVE)
            self._conn.execute(f'LISTEN "{CHANNEL}"')
        except psycopg.Error as err:
            self.close()
            raise StoreUnavailable(f"{self.display}: LISTEN: {str(err).strip()}") from err

    def wait(self, timeout: float) -> list[int]:
        """Ids notified within `timeout` seconds (empty on timeout); StoreUnavailable when the
        connection is lost."""
        import psycopg

        if self._conn is None:
            raise StoreUnavailable(f"{self.display}: LISTEN connection is not open")
        try:
            got = [n.payload for n in self._conn.notifies(timeout=timeout, stop_after=1)]
            if got:  # drain what is already queued: one wake-up for a burst
                got += [n.payload for n in self._conn.notifies(timeout=0.0)]
        except psycopg.Error as err:
            self.close()
            raise StoreUnavailable(f"{self.display}: LISTEN: {str(err).strip()}") from err
        return [int(p) for p in got if p.isdigit()]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
