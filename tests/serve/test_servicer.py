"""The servicer in-process: every RPC, every documented error status, fallbacks, exclusions."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from index.events import open_store
from serve.reload import ModelHolder
from serve.servicer import RecommenderServicer
from bench.bundle_factory import png, probe_item
from tests.serve.conftest import SMALL_LIMITS, Aborted, brute_force, make_holder

S = grpc.StatusCode


def rec(servicer, ctx, user_id=10, k=10, **fields) -> pb.RecommendResponse:
    """Call Recommend."""
    return servicer.Recommend(pb.RecommendRequest(user_id=user_id, k=k, **fields), ctx)


def ids_of(resp) -> list[int]:
    """Item ids of a RecommendResponse."""
    return [it.item_id for it in resp.items]


def status(call) -> grpc.StatusCode:
    """The status code a call aborts with."""
    with pytest.raises(Aborted) as info:
        call()
    return info.value.code


def test_known_user_excludes_seen_inside_search(servicer, holder, ctx):
    model = holder.model
    row = model.user_row(10)
    seen = model.seen_items(row)
    resp = rec(servicer, ctx, user_id=10, k=20)
    assert resp.model_version == 1 and resp.source == pb.SOURCE_USER_VECTOR and not resp.fallback
    assert ids_of(resp) == brute_force(model, model.users[row], 20, seen)
    assert not set(ids_of(resp)) & set(seen.tolist())
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)


def test_exclude_ids_and_include_seen(servicer, holder, ctx):
    model = holder.model
    row = model.user_row(20)
    top = ids_of(rec(servicer, ctx, user_id=20, k=5, exclude_seen=False))
    assert top == brute_force(model, model.users[row], 5, [])
    resp = rec(servicer, ctx, user_id=20, k=5, exclude_seen=False, exclude_item_ids=top[:2])
    assert ids_of(resp) == brute_force(model, model.users[row], 5, top[:2])


def test_seen_items_never_returned_for_any_user(servicer, holder, ctx):
    model = holder.model
    for user_id in range(0, 500, 10):
        seen = set(model.seen_items(model.user_row(user_id)).tolist())
        assert not seen & set(ids_of(rec(servicer, ctx, user_id=user_id, k=195)))


def test_unknown_user_gets_popularity(servicer, holder, ctx):
    model = holder.model
    resp = rec(servicer, ctx, user_id=7, k=5)
    assert resp.fallback and resp.source == pb.SOURCE_POPULARITY and "unknown" in resp.fallback_reason
    popular = model._pop_ids[:6].tolist()
    assert ids_of(resp) == popular[:5]
    resp = rec(servicer, ctx, user_id=7, k=5, exclude_item_ids=[popular[0]])
    assert ids_of(resp) == popular[1:6]


def test_unknown_user_with_recent_items_folds_in(servicer, holder, ctx):
    model = holder.model
    recent = [1003, 1050, 1120]
    query = np.mean([model.index.reconstruct(i) for i in recent], axis=0)
    resp = rec(servicer, ctx, user_id=7, k=10, recent_item_ids=recent + [99_999])
    assert resp.fallback and resp.source == pb.SOURCE_RECENT_ITEMS
    assert "3 recent" in resp.fallback_reason
    assert ids_of(resp) == brute_force(model, query, 10, recent)
    resp = rec(servicer, ctx, user_id=7, k=3, recent_item_ids=[99_999])
    assert resp.source == pb.SOURCE_POPULARITY and "no recent item" in resp.fallback_reason


@pytest.mark.parametrize("fields", [dict(k=0), dict(k=1001), dict(k=-5), dict(user_id=-1),
                                    dict(exclude_item_ids=[3, -2]), dict(recent_item_ids=[-1]),
                                    dict(exclude_item_ids=list(range(301))),
                                    dict(recent_item_ids=list(range(51)))])
def test_recommend_invalid_argument(servicer, ctx, fields):
    fields = dict(user_id=10, k=5) | fields
    assert status(lambda: servicer.Recommend(pb.RecommendRequest(**fields), ctx)) == S.INVALID_ARGUMENT


def test_recommend_batch(servicer, ctx):
    reqs = [pb.RecommendRequest(user_id=u, k=4) for u in (10, 7, 30)]
    resp = servicer.RecommendBatch(pb.RecommendBatchRequest(requests=reqs), ctx)
    assert [ids_of(r) for r in resp.responses] == [ids_of(servicer.Recommend(r, ctx)) for r in reqs]
    assert [r.source for r in resp.responses] == [pb.SOURCE_USER_VECTOR, pb.SOURCE_POPULARITY,
                                                   pb.SOURCE_USER_VECTOR]
    for bad in ([], [pb.RecommendRequest(user_id=1, k=1)] * 9, reqs + [pb.RecommendRequest(k=0)]):
        call = lambda: servicer.RecommendBatch(pb.RecommendBatchRequest(requests=bad), ctx)  # noqa: E731
        assert status(call) == S.INVALID_ARGUMENT


def test_encode_item(servicer, holder, ctx):
    image, text = probe_item()
    resp = servicer.EncodeItem(pb.EncodeItemRequest(image=image, text=text), ctx)
    vec = np.array(resp.vector)
    assert resp.model_version == 1 and vec.shape == (16,)
    assert np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)
    np.testing.assert_allclose(vec, holder.model.users[0], atol=1e-6)
    assert holder.model.n_items == 200  # no side effects
    for req in (pb.EncodeItemRequest(text="red mug"), pb.EncodeItemRequest(image=image)):
        assert len(servicer.EncodeItem(req, ctx).vector) == 16


@pytest.mark.parametrize("image,text,code", [
    (b"", "", S.INVALID_ARGUMENT), (b"", "   ", S.INVALID_ARGUMENT),
    (b"garbage bytes", "x", S.INVALID_ARGUMENT), (png((1, 2, 3))[:300], "", S.INVALID_ARGUMENT),
    (b"\0" * 200_001, "x", S.RESOURCE_EXHAUSTED), (b"", "x" * 501, S.RESOURCE_EXHAUSTED),
    (png((9, 9, 9), (2000, 1001)), "", S.RESOURCE_EXHAUSTED)],
    ids=["empty", "blank-text", "garbage", "truncated", "big-bytes", "long-text", "many-pixels"])
def test_encode_and_upsert_errors(servicer, ctx, image, text, code):
    assert status(lambda: servicer.EncodeItem(pb.EncodeItemRequest(image=image, text=text), ctx)) == code
    req = pb.UpsertItemRequest(item_id=5, image=image, text=text)
    assert status(lambda: servicer.UpsertItem(req, ctx)) == code


def test_upsert_then_recommend_and_delete(servicer, holder, ctx):
    image, text = probe_item()
    resp = servicer.UpsertItem(pb.UpsertItemRequest(item_id=77, image=image, text=text), ctx)
    assert not resp.replaced and resp.index_items == 201 and resp.model_version == 1
    top = rec(servicer, ctx, user_id=0, k=5)
    assert top.items[0].item_id == 77 and top.items[0].score == pytest.approx(1.0, abs=1e-5)
    again = pb.UpsertItemRequest(item_id=77, image=image, text=text)
    assert status(lambda: servicer.UpsertItem(again, ctx)) == S.ALREADY_EXISTS
    again.overwrite = True
    assert servicer.UpsertItem(again, ctx).replaced
    deleted = servicer.DeleteItem(pb.DeleteItemRequest(item_id=77), ctx)
    assert deleted.index_items == 200
    assert 77 not in ids_of(rec(servicer, ctx, user_id=0, k=50))
    assert status(lambda: servicer.DeleteItem(pb.DeleteItemRequest(item_id=77), ctx)) == S.NOT_FOUND
    assert status(lambda: servicer.DeleteItem(pb.DeleteItemRequest(item_id=5), ctx)) == S.NOT_FOUND
    assert status(lambda: servicer.DeleteItem(pb.DeleteItemRequest(item_id=-3), ctx)) == S.INVALID_ARGUMENT
    neg = pb.UpsertItemRequest(item_id=-1, text="red")
    assert status(lambda: servicer.UpsertItem(neg, ctx)) == S.INVALID_ARGUMENT


@pytest.mark.parametrize("factory", ["HNSW16", "IVF4,Flat"])
def test_delete_with_tombstones(tmp_path, metrics, ctx, factory):
    from bench.bundle_factory import BundleSpec, write_test_bundle

    path = write_test_bundle(tmp_path, BundleSpec(factory=factory, n_items=300))
    servicer = RecommenderServicer(make_holder(path, metrics), metrics, SMALL_LIMITS)
    top = ids_of(rec(servicer, ctx, user_id=10, k=5))
    servicer.DeleteItem(pb.DeleteItemRequest(item_id=top[0]), ctx)
    assert top[0] not in ids_of(rec(servicer, ctx, user_id=10, k=50))
    popular = ids_of(rec(servicer, ctx, user_id=7, k=3))
    servicer.DeleteItem(pb.DeleteItemRequest(item_id=popular[0]), ctx)
    assert popular[0] not in ids_of(rec(servicer, ctx, user_id=7, k=3))


def test_no_encoder_is_failed_precondition(bundle_no_encoder, metrics, ctx):
    servicer = RecommenderServicer(make_holder(bundle_no_encoder, metrics), metrics, SMALL_LIMITS)
    image, text = probe_item()
    assert status(lambda: servicer.EncodeItem(pb.EncodeItemRequest(image=image, text=text), ctx)) \
        == S.FAILED_PRECONDITION
    req = pb.UpsertItemRequest(item_id=9, image=image, text=text)
    assert status(lambda: servicer.UpsertItem(req, ctx)) == S.FAILED_PRECONDITION
    info = servicer.GetModelInfo(pb.GetModelInfoRequest(), ctx)
    assert not info.cold_start and info.user_groups == 1
    assert len(rec(servicer, ctx).items) == 10


def test_no_bundle_is_unavailable(metrics, ctx):
    servicer = RecommenderServicer(ModelHolder(open_store(":memory:"), metrics), metrics,
                                   SMALL_LIMITS)
    calls = [lambda: rec(servicer, ctx),
             lambda: servicer.RecommendBatch(pb.RecommendBatchRequest(
                 requests=[pb.RecommendRequest(k=1)]), ctx),
             lambda: servicer.EncodeItem(pb.EncodeItemRequest(text="red"), ctx),
             lambda: servicer.UpsertItem(pb.UpsertItemRequest(item_id=1, text="red"), ctx),
             lambda: servicer.DeleteItem(pb.DeleteItemRequest(item_id=1), ctx),
             lambda: servicer.GetModelInfo(pb.GetModelInfoRequest(), ctx)]
    assert [status(c) for c in calls] == [S.UNAVAILABLE] * len(calls)


def test_model_info(servicer, ctx):
    info = servicer.GetModelInfo(pb.GetModelInfoRequest(), ctx)
    assert (info.model_version, info.dim, info.metric, info.backbone) == (1, 16, "ip", "lightgcn")
    assert (info.users, info.items, info.index_items, info.cold_start) == (50, 200, 200, True)
    assert info.faiss_factory == "Flat" and info.metrics["recall@20"] == pytest.approx(0.1)
    assert info.created and info.loaded_at and info.normalized


def test_internal_errors_are_contained(servicer, holder, metrics, ctx, monkeypatch, caplog):
    def boom(_query):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(holder.model, "recommend", boom)
    with pytest.raises(Aborted) as info:
        rec(servicer, ctx)
    assert info.value.code == S.INTERNAL and "ref" in info.value.details
    assert "bug" not in info.value.details and "ZeroDivisionError" in caplog.text
    monkeypatch.undo()
    assert len(rec(servicer, ctx).items) == 10
    sample = metrics.registry.get_sample_value
    assert sample("recsys_requests_total", {"method": "Recommend", "code": "INTERNAL", "arm": "none"}) == 1
    assert sample("recsys_requests_total", {"method": "Recommend", "code": "OK", "arm": "none"}) == 1
    assert sample("recsys_request_duration_seconds_count",
                  {"method": "Recommend", "code": "OK", "arm": "none"}) == 1
