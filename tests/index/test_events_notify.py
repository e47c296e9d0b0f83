"""LISTEN/NOTIFY on a real PostgreSQL server: every committed event is announced, nothing else."""
from __future__ import annotations

import pytest

from index import events as ev
from index.events import StoreUnavailable, open_store
from index.events.postgres import LISTEN_APP


@pytest.fixture
def pg_store(pg_cluster):
    """An empty PostgreSQL store and a connected listener on its database."""
    store = open_store(pg_cluster.new_store_url())
    listener = store.listener()
    listener.connect()
    yield store, listener
    listener.close()
    store.close()


def test_sqlite_has_no_listener(tmp_path):
    store = open_store(tmp_path / "state")
    assert store.listener() is None  # SQLite: the poll only
    store.close()


def test_every_committed_event_is_announced_with_its_id(pg_store):
    store, listener = pg_store
    assert listener.wait(0.2) == []
    ids = [store.append(e)[0] for e in (ev.upsert(7, b"", "red shoe"),
                                        ev.interactions(3, [7], [100], "click"), ev.delete(7))]
    got = []
    for _ in range(20):
        got += listener.wait(1.0)
        if len(got) == len(ids):
            break
    assert got == ids


def test_nothing_is_announced_without_a_commit(pg_store):
    store, listener = pg_store
    first, _ = store.append(ev.upsert(7, b"", "red shoe", "req-7"))
    assert listener.wait(2.0) == [first]
    assert store.append(ev.upsert(7, b"", "red shoe", "req-7")) == (first, True)
    with pytest.raises(RuntimeError), store._cursor(write=True) as cur:
        store._announce(cur, 12345)
        raise RuntimeError("rolled back")
    assert listener.wait(1.0) == []  # neither the duplicate nor the rolled-back transaction


def test_a_killed_listen_connection_raises_and_reconnects(pg_store):
    store, listener = pg_store
    with store._cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()", (LISTEN_APP,))
    with pytest.raises(StoreUnavailable, match="LISTEN"):
        for _ in range(10):
            listener.wait(0.5)
    listener.connect()
    event_id, _ = store.append(ev.delete(9))
    assert listener.wait(5.0) == [event_id]
