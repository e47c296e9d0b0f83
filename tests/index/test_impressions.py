"""The impressions table on SQLite and PostgreSQL."""
from __future__ import annotations

import time

import numpy as np
import pytest

from index import events as ev
from index.events import StoreUnavailable, open_store
from index.events import impressions as imp_store
from index.events.impressions import Impression


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def row(i: int, experiment: str = "exp1", created: float = 100.0) -> Impression:
    return Impression(f"imp-{i}", experiment, "control" if i % 2 else "treatment", i, 3,
                      created + i, np.array([i, i + 1, i + 2], dtype=np.int64))


def test_roundtrip_per_experiment_and_not_an_event(store):
    imp_store.ensure_schema(store)
    imp_store.ensure_schema(store)  # idempotent
    imp_store.append(store, [row(i) for i in range(5)] + [row(9, "other")])
    got = imp_store.read(store, "exp1")
    assert [r.impression_id for r in got] == [f"imp-{i}" for i in range(5)]
    assert got[2].item_ids.tolist() == [2, 3, 4] and got[2].arm == "treatment"
    assert (got[2].user_id, got[2].model_version, got[2].created) == (2, 3, 102.0)
    assert imp_store.time_range(store, "exp1") == (100.0, 104.0)
    assert imp_store.time_range(store, "nothing") is None
    assert store.head() == 0  # impressions never move the event head


def test_interactions_since_reads_only_interactions(store):
    store.append(ev.upsert(7, b"", "x"))
    store.append(ev.interactions(3, [7, 8], [10, 11], "click"))
    cut = time.time() + 10
    found = imp_store.interactions_since(store, 0)
    assert [(e.user_id, e.item_ids.tolist(), e.action) for e in found] == [(3, [7, 8], "click")]
    assert imp_store.interactions_since(store, cut) == []

