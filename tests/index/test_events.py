"""The event store on SQLite and on a real PostgreSQL server: one parametrised contract."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from index import events as ev
from index.events import StoreFull, StoreUnavailable, open_store
from index.events import store as store_module


@pytest.fixture
def store(store_url):
    """An empty store of each backend."""
    s = open_store(store_url)
    yield s
    s.close()


def _fill(store) -> list[int]:
    """One event of each kind plus a second upsert; returns their ids."""
    return [store.append(e)[0] for e in (
        ev.upsert(7, b"\x89PNG-bytes", "red shoe", "req-1"),
        ev.interactions(3, [7, 8], [100, 101], "click"),
        ev.delete(8),
        ev.upsert(9, b"", "blue mug"))]


def test_append_read_roundtrip_in_commit_order(store):
    ids = _fill(store)
    assert ids == sorted(ids) and store.head() == ids[-1]
    batch = store.read(0)
    assert [e.id for e in batch.events] == ids and batch.skipped == [] and batch.last_id == ids[-1]
    up, inter, dele, up2 = batch.events
    assert (up.kind, up.item_id, up.image, up.text, up.request_id) == (
        ev.UPSERT, 7, b"\x89PNG-bytes", "red shoe", "req-1")
    assert inter.user_id == 3 and inter.item_ids.tolist() == [7, 8]
    assert inter.timestamps.tolist() == [100, 101] and inter.action == "click"
    assert dele.kind == ev.DELETE and dele.item_id == 8 and up2.image == b""
    assert [e.id for e in store.read(ids[1]).events] == ids[2:]
    assert store.read(ids[-1]).events == []
    assert [e.id for e in store.get([ids[2], 999]).events] == [ids[2]]


def test_request_id_is_applied_once(store):
    first, dup = store.append(ev.upsert(7, b"", "a", "retry-me"))
    again, dup2 = store.append(ev.upsert(7, b"", "a", "retry-me"))
    assert (dup, dup2, again) == (False, True, first)
    assert len(store.read(0)) == 1 and store.lookup("retry-me") == first
    assert store.lookup("never-sent") is None


def test_reads_are_paged_by_rows_and_bytes(store, monkeypatch):
    for i in range(5):
        store.append(ev.upsert(i, bytes(1000), "x"))
    assert [e.id for e in store.read(0, limit=2).events] == [1, 2]
    monkeypatch.setattr(store_module, "READ_BYTES", 2500)
    assert len(store.read(0)) == 2
    assert len(store.read(0, through=1)) == 1


def test_a_damaged_row_is_skipped_and_named(store, caplog):
    ids = _fill(store)
    with store._cursor(write=True) as cur:  # bytes changed behind the store's back
        cur.execute(store._sql("UPDATE events SET text = ? WHERE id = ?"), ("tampered", ids[0]))
    batch = store.read(0)
    assert batch.skipped == [ids[0]] and [e.id for e in batch.events] == ids[1:]
    assert batch.last_id == ids[-1]
    assert f"event {ids[0]} fails its checksum" in caplog.text


def test_concurrent_writers_get_unique_ids_in_order(store_url):
    stores = [open_store(store_url) for _ in range(2)]  # two connections, like two processes

    def write(k: int) -> None:
        for i in range(20):
            stores[k % 2].append(ev.interactions(k, [i], [i]))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = stores[0].read(0, limit=1000).events
    assert len(events) == 80 and [e.id for e in events] == sorted({e.id for e in events})
    for s in stores:
        s.close()


def test_compaction_keeps_upserts_the_bundle_lacks(store):
    a = store.append(ev.upsert(1, b"", "first"))[0]
    store.append(ev.upsert(1, b"", "second"))
    store.append(ev.upsert(2, b"", "in the bundle"))
    store.append(ev.upsert(3, b"", "not in the bundle"))
    store.append(ev.interactions(5, [1, 2], [0, 0]))
    store.append(ev.upsert(4, b"", "deleted"))
    cut = store.append(ev.delete(4))[0]
    later = store.append(ev.upsert(1, b"", "after the watermark"))[0]
    assert store.latest_item_events(cut)[0][:2] == (1, a + 1)
    dropped = store.compact(cut, bundle_items=np.array([1, 2]))
    left = store.read(0).events
    assert dropped == 6 and [(e.item_id, e.text) for e in left] == [
        (3, "not in the bundle"), (1, "after the watermark")]
    assert left[-1].id == later and store.stats()["compacted_through"] == cut
    assert store.append(ev.delete(3))[0] > later  # ids are never reused


def test_stats_count_kinds_users_and_disk(store):
    _fill(store)
    stats = store.stats()
    assert stats["kinds"]["upsert"]["events"] == 2 and stats["users"] == 1
    assert stats["interactions"] == 2 and stats["disk_bytes"] > 0 and stats["head"] == 4


def test_sqlite_is_wal_synchronous_full(tmp_path):
    store = open_store(tmp_path)
    with store._cursor() as cur:
        assert cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert cur.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_sqlite_full_disk_is_store_full(tmp_path):
    full = ev.SQLiteStore(tmp_path / "e.sqlite3", max_pages=12)
    full.create()
    with pytest.raises(StoreFull, match="full"):
        for _ in range(50):
            full.append(ev.upsert(1, bytes(4096), "x"))
    assert full.head() >= 1  # what was committed is still there


def test_sqlite_file_damage_is_skipped(tmp_path):
    store = open_store(tmp_path)
    for i, text in enumerate(["fine", "marker-zz-9f3b", "fine too"]):
        store.append(ev.upsert(i, b"", text))
    store.close()  # the last connection checkpoints the WAL into the file
    path = tmp_path / ev.FILE_NAME
    data = path.read_bytes()
    assert data.count(b"marker-zz-9f3b") == 1
    path.write_bytes(data.replace(b"marker-zz-9f3b", b"marker-yy-9f3b"))
    batch = open_store(tmp_path).read(0)
    assert batch.skipped == [2] and [e.text for e in batch.events] == ["fine", "fine too"]


def test_postgres_down_is_unavailable_then_recovers(pg_cluster):
    store = open_store(pg_cluster.new_store_url())
    store.append(ev.upsert(1, b"", "before"))
    pg_cluster.stop()
    try:
        with pytest.raises(StoreUnavailable):
            store.append(ev.upsert(2, b"", "while down"))
        with pytest.raises(StoreUnavailable):
            store.head()
    finally:
        pg_cluster.start()
    store.append(ev.upsert(3, b"", "after"))
    assert [e.text for e in store.read(0).events] == ["before", "after"]
