"""Real server processes on one event store: replication between --reuse-port processes on
PostgreSQL (by polling, and at once by LISTEN/NOTIFY, also after the LISTEN connection was
killed), and a SIGKILL + restart that serves exactly what was acknowledged (SQLite)."""
from __future__ import annotations

import signal
import time

from bench.pgcluster import free_port
from bench.bundle_factory import BundleSpec, probe_item, write_test_bundle
from bench.procs import client, clients_per_process, start_server, stop, wait_serving
from index.events.postgres import LISTEN_APP

POLL = 0.2


def test_reuse_port_processes_share_writes_through_postgresql(tmp_path, pg_cluster):
    write_test_bundle(tmp_path, BundleSpec())
    url, port = pg_cluster.new_store_url(), free_port()
    options = ("--store", url, "--poll-seconds", str(POLL), "--reuse-port")
    procs = [start_server(tmp_path, *options, port=port)[0] for _ in range(2)]
    try:
        for proc in procs:
            wait_serving(client(port), proc)
        time.sleep(0.5)  # both loaded: each connection lands on a SERVING process
        a, b = clients_per_process(port)
        assert b.recommend(0, 1).items[0].item_id != 77
        written = a.upsert(77, *probe_item())
        start = time.monotonic()
        while b.recommend(0, 1).items[0].item_id != 77:
            assert time.monotonic() - start < POLL + 5, "b never applied a's upsert"
            time.sleep(0.02)
        assert b.info().store_position >= written.event_id
        a.record(0, [77], kind="click")
        while 77 in [it.item_id for it in b.recommend(0, 5).items]:
            assert time.monotonic() - start < POLL + 10, "b never applied a's interactions"
            time.sleep(0.02)
        assert b.recommend(0, 5).recent_items_used == 1
    finally:
        for proc in procs:
            stop(proc)


def _visible(c, item_id: int, within: float) -> float:
    """Seconds until item_id tops user 0's list on c's process (fails after `within`)."""
    start = time.monotonic()
    while c.recommend(0, 1).items[0].item_id != item_id:
        assert time.monotonic() - start < within, f"item {item_id} not visible in {within} s"
        time.sleep(0.01)
    return time.monotonic() - start


def _kill_listen_connections(url: str) -> int:
    """Terminate the servers' LISTEN connections, as a database failover or proxy would."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                "application_name = %s", (LISTEN_APP,)).fetchall())


def test_notify_applies_writes_long_before_the_poll(tmp_path, pg_cluster):
    write_test_bundle(tmp_path, BundleSpec())
    url, port = pg_cluster.new_store_url(), free_port()
    options = ("--store", url, "--poll-seconds", "60", "--reuse-port")  # no poll in this test
    procs = [start_server(tmp_path, *options, port=port)[0] for _ in range(2)]
    try:
        for proc in procs:
            wait_serving(client(port), proc)
        time.sleep(0.5)
        a, b = clients_per_process(port)
        a.upsert(77, *probe_item())
        _visible(b, 77, within=5)
        a.delete(77)
        start = time.monotonic()
        while b.recommend(0, 1).items[0].item_id == 77:
            assert time.monotonic() - start < 5, "b never applied a's delete"
            time.sleep(0.01)
        assert _kill_listen_connections(pg_cluster.url()) == 2
        time.sleep(1.0)  # both reconnect (backoff 0.5 s)
        a.upsert(78, *probe_item())
        _visible(b, 78, within=5)
    finally:
        for proc in procs:
            stop(proc)


def test_sigkill_and_restart_serve_exactly_what_was_acknowledged(tmp_path):
    write_test_bundle(tmp_path, BundleSpec())
    proc, port, _ = start_server(tmp_path, "--poll-seconds", str(POLL))
    try:
        c = client(port)
        wait_serving(c, proc)
        c.upsert(77, *probe_item())
        c.upsert(78, b"", "blue striped mug", request_id="u-78")
        victim = c.recommend(10, 1).items[0].item_id
        c.delete(victim)
        c.record(20, [1001, 1002, 78], kind="click")
        c.record(555, [1003])  # a user the bundle does not know
        users = (0, 10, 20, 555)
        before = {u: [(i.item_id, round(i.score, 4)) for i in c.recommend(u, 10).items]
                  for u in users}
        info = c.info()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc, port, _ = start_server(tmp_path, "--poll-seconds", str(POLL))
        c = client(port)
        wait_serving(c, proc)
        after = {u: [(i.item_id, round(i.score, 4)) for i in c.recommend(u, 10).items]
                 for u in users}
        assert after == before
        again = c.info()
        assert (again.store_position, again.index_items, again.online_interactions) == (
            info.store_position, info.index_items, 4)
        assert c.upsert(78, b"", "blue striped mug", request_id="u-78").duplicate
    finally:
        stop(proc)
