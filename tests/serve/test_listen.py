"""The poller's LISTEN connection and the start-up wait, in-process against real PostgreSQL."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from bench.pgcluster import free_port
from index import events as ev
from index.events import open_store
from index.events.postgres import LISTEN_APP
from serve.metrics import Metrics
from serve.online import Poller
from serve.storewait import StoreWait
from tests.serve.conftest import make_holder


def _until(check, timeout: float = 5.0) -> None:
    """Wait until check() is true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _sample(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    """A sample of the holder's metrics registry."""
    return metrics.registry.get_sample_value(name, labels or {})


def _click(user: int, item: int):
    """One interactions event."""
    return ev.interactions(user, np.array([item]), np.array([1]), "click")


def test_listen_wakes_the_poller_and_survives_a_killed_connection(bundle_v1, pg_cluster, caplog):
    url = pg_cluster.new_store_url()
    metrics = Metrics()
    holder = make_holder(bundle_v1, metrics, store=open_store(url))
    other = open_store(url)  # another process's connection
    poller = Poller(holder, metrics, poll_seconds=60)  # the poll never fires in this test
    poller.start()
    try:
        _until(lambda: _sample(metrics, "recsys_store_listening") == 1)
        first, _ = other.append(_click(10, 1001))
        _until(lambda: holder.model.position == first)
        with caplog.at_level(logging.INFO, logger="serve.online"):
            with other._cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = %s", (LISTEN_APP,))
            _until(lambda: _sample(metrics, "recsys_store_listen_failures_total") == 1)
            _until(lambda: _sample(metrics, "recsys_store_listening") == 1)
            second, _ = other.append(_click(10, 1002))
            _until(lambda: holder.model.position == second)
        lost = [r for r in caplog.records if "LISTEN on the event store failed" in r.message]
        back = [r for r in caplog.records if "is back" in r.message]
        assert len(lost) == len(back) == 1
        assert holder.model.online.items(10).tolist() == [1001, 1002]
    finally:
        poller.stop()
        other.close()
        holder.store.close()


def test_store_wait_retries_logs_once_and_gives_up(caplog):
    store = open_store(f"postgresql://ptmrec:s3cret@127.0.0.1:{free_port()}/ptmrec", create=False)
    metrics, gave_up, ready = Metrics(), [], threading.Event()
    wait = StoreWait(store, metrics, 2.0, ready.set, gave_up.append)
    with caplog.at_level(logging.INFO, logger="serve.storewait"):
        wait.start()
        _until(lambda: bool(gave_up), timeout=20)
    assert not ready.is_set()
    assert _sample(metrics, "recsys_store_errors_total", {"op": "connect"}) >= 3  # backoff tries
    assert len([r for r in caplog.records if "unreachable" in r.message]) == 1
    assert "after 2 s" in gave_up[0] and "s3cret" not in gave_up[0]
    assert "127.0.0.1" in gave_up[0] and "waiting" in wait.waiting_for


def test_store_wait_calls_ready_once_the_store_answers(pg_cluster):
    store = open_store(pg_cluster.new_store_url(), create=False)
    metrics, ready = Metrics(), threading.Event()
    wait = StoreWait(store, metrics, 0, ready.set, lambda msg: None)
    wait.start()
    assert ready.wait(10) and wait.waiting_for is None
    assert _sample(metrics, "recsys_store_ready") == 1 and store.head() == 0  # schema created
    store.close()
