"""Durable writes through the servicer: RecordInteractions, request ids, fold-in, store failures."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from index.events import SQLiteStore, open_store
from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from serve.metrics import Metrics
from serve.servicer import RecommenderServicer
from bench.bundle_factory import probe_item
from tests.serve.conftest import SMALL_LIMITS, Aborted, brute_force, make_holder
from tests.serve.test_servicer import ids_of, rec, status

S = grpc.StatusCode


def record(servicer, ctx, user_id=10, item_ids=(1001,), **fields):
    """Call RecordInteractions."""
    return servicer.RecordInteractions(pb.RecordInteractionsRequest(
        user_id=user_id, item_ids=list(item_ids), **fields), ctx)


def test_known_user_feedback_is_excluded_and_folded_in(servicer, holder, ctx):
    model = holder.model
    row = model.user_row(10)
    before = rec(servicer, ctx, user_id=10, k=20)
    assert before.recent_items_used == 0
    clicked = ids_of(rec(servicer, ctx, user_id=20, k=5))  # someone else's taste
    resp = record(servicer, ctx, user_id=10, item_ids=clicked, kind="click")
    assert resp.recorded == 5 and resp.event_id == 1 and not resp.duplicate
    after = rec(servicer, ctx, user_id=10, k=20)
    assert after.source == pb.SOURCE_USER_VECTOR and after.recent_items_used == 5
    assert not set(ids_of(after)) & set(clicked) and ids_of(after) != ids_of(before)
    r = np.mean([model.index.reconstruct(i) for i in clicked], axis=0)
    u = model.users[row]
    w = 5 / (5 + 5.0)
    query = np.linalg.norm(u) * ((1 - w) * u / np.linalg.norm(u) + w * r / np.linalg.norm(r))
    seen = np.concatenate([model.seen_items(row), clicked])
    assert ids_of(after) == brute_force(model, query, 20, seen)
    kept = rec(servicer, ctx, user_id=10, k=200, exclude_seen=False)
    assert set(clicked) <= set(ids_of(kept))  # exclude_seen=false keeps them


def test_unknown_user_feedback_is_the_recent_items_fold_in(servicer, ctx):
    assert rec(servicer, ctx, user_id=4242).source == pb.SOURCE_POPULARITY
    record(servicer, ctx, user_id=4242, item_ids=[1003, 1004])
    resp = rec(servicer, ctx, user_id=4242, k=5)
    assert resp.source == pb.SOURCE_RECENT_ITEMS and resp.recent_items_used == 2
    assert not {1003, 1004} & set(ids_of(resp))


def test_retried_request_ids_are_applied_once(servicer, holder, ctx):
    image, text = probe_item()
    first = servicer.UpsertItem(pb.UpsertItemRequest(item_id=77, image=image, text=text,
                                                     request_id="up-1"), ctx)
    again = servicer.UpsertItem(pb.UpsertItemRequest(item_id=77, image=image, text=text,
                                                     request_id="up-1"), ctx)
    assert (first.duplicate, again.duplicate, again.event_id) == (False, True, first.event_id)
    a = record(servicer, ctx, user_id=10, item_ids=[1001, 77], request_id="rec-1")
    b = record(servicer, ctx, user_id=10, item_ids=[1001, 77], request_id="rec-1")
    assert b.duplicate and b.event_id == a.event_id and holder.model.online.total == 2
    d = servicer.DeleteItem(pb.DeleteItemRequest(item_id=77, request_id="del-1"), ctx)
    d2 = servicer.DeleteItem(pb.DeleteItemRequest(item_id=77, request_id="del-1"), ctx)
    assert d2.duplicate and d2.event_id == d.event_id  # not NOT_FOUND on the retry
    assert holder.store.head() == 3
    info = servicer.GetModelInfo(pb.GetModelInfoRequest(), ctx)
    assert (info.store_position, info.event_watermark, info.online_users) == (3, 0, 1)
    assert info.store == "sqlite::memory:"


@pytest.mark.parametrize("fields", [
    dict(item_ids=[]), dict(item_ids=[-1]), dict(item_ids=list(range(1000, 1000 + 1001))),
    dict(item_ids=[1001, 1002], timestamps=[5]), dict(item_ids=[1001], timestamps=[-5]),
    dict(item_ids=[123456]), dict(item_ids=[1001], kind="x" * 65),
    dict(item_ids=[1001], request_id="r" * 129), dict(user_id=-3, item_ids=[1001])])
def test_bad_interactions_are_invalid_argument(servicer, holder, ctx, fields):
    request = pb.RecordInteractionsRequest(**({"user_id": 10} | fields))
    assert status(lambda: servicer.RecordInteractions(request, ctx)) == S.INVALID_ARGUMENT
    assert holder.store.head() == 0


def test_a_full_store_refuses_writes_and_reads_keep_serving(bundle_v1, ctx, tmp_path):
    metrics = Metrics()
    full = SQLiteStore(tmp_path / "e.sqlite3", max_pages=12)
    full.create()
    holder = make_holder(bundle_v1, metrics, store=full)
    servicer = RecommenderServicer(holder, metrics, SMALL_LIMITS)
    before = ids_of(rec(servicer, ctx, user_id=0, k=5))
    for item_id in range(2000, 2100):
        try:
            servicer.UpsertItem(pb.UpsertItemRequest(item_id=item_id, text="red " * 120), ctx)
        except Aborted as err:
            assert err.code == S.RESOURCE_EXHAUSTED and "event store is full" in err.details
            break
    else:
        pytest.fail("the store never filled up")
    assert item_id > 2000 and not holder.model.has_item(item_id)  # refused: not applied
    assert holder.model.position == holder.store.head() == item_id - 2000
    assert ids_of(rec(servicer, ctx, user_id=0, k=5)) == before
    assert metrics.registry.get_sample_value("recsys_store_errors_total", {"op": "write"}) == 1


def test_processes_on_one_store_converge(bundle_v1, store_url):
    """Two holders (two processes' worth of state) on one store: each applies the other's."""
    a = make_holder(bundle_v1, Metrics(), store=open_store(store_url))
    b = make_holder(bundle_v1, Metrics(), store=open_store(store_url))
    a.upsert(77, *probe_item(), overwrite=False)
    b.delete(1005)
    a.record(10, np.array([1001, 77]), np.array([1, 2]), "click")  # applies b's delete first
    assert not a.model.has_item(1005) and a.model.position == 3
    b.upsert(78, b"", "blue mug", overwrite=False)  # b applies a's events below its own first
    assert b.model.has_item(77) and b.model.online.items(10).tolist() == [1001, 77]
    assert a.catch_up() == 1 and a.model.has_item(78)
    assert a.model.position == b.model.position == 4
    np.testing.assert_allclose(a.model.index.reconstruct(78), b.model.index.reconstruct(78))
