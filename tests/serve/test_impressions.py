"""serve.impressions: the batched impression writer, on SQLite and PostgreSQL."""
from __future__ import annotations

import time

import numpy as np
import pytest

from index.events import StoreUnavailable, open_store
from index.events import impressions as imp_store
from index.events.impressions import Impression
from serve.experiment_config import Impressions
from serve.impressions import ImpressionWriter
from serve.metrics import Metrics


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def row(i: int) -> Impression:
    return Impression(f"imp-{i}", "exp1", "control", i, 3, 100.0 + i,
                      np.array([i, i + 1], dtype=np.int64))


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def counted(metrics, result):
    return metrics.registry.get_sample_value("recsys_impressions_total", {"result": result})


def test_writer_batches_off_the_request_thread_and_flushes_on_stop(store):
    metrics = Metrics()
    writer = ImpressionWriter(store, metrics, Impressions(flush_seconds=0.05, batch=7))
    writer.start()
    start = time.perf_counter()
    assert all(writer.offer(row(i)) for i in range(30))
    assert time.perf_counter() - start < 0.05  # no database round trip per offer
    wait_for(lambda: len(imp_store.read(store, "exp1")) == 30)
    writer.offer(row(31))
    writer.stop()
    assert len(imp_store.read(store, "exp1")) == 31
    assert counted(metrics, "written") == 31 and counted(metrics, "queued") == 31


def test_full_queue_drops_and_failed_writes_are_retried(store, monkeypatch):
    metrics = Metrics()
    writer = ImpressionWriter(store, metrics, Impressions(flush_seconds=0.05, queue=3))
    assert [writer.offer(row(i)) for i in range(4)] == [True, True, True, False]
    assert counted(metrics, "dropped") == 1
    real, calls = imp_store.append, []

    def flaky(s, rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise StoreUnavailable("database restarting")
        real(s, rows)

    monkeypatch.setattr(imp_store, "append", flaky)
    writer.start()
    wait_for(lambda: len(imp_store.read(store, "exp1")) == 3)
    writer.stop()
    assert calls[:2] == [3, 3] and counted(metrics, "failed") == 0
