"""Every call counted: what is refused before a handler shows in recsys_requests_total."""
from __future__ import annotations

import time
from collections import Counter

import grpc
import pytest

from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from serve.client import RecommenderClient
from serve.limits import Limits
from serve.server import serve

LIMITS = Limits(max_image_bytes=1000)  # messages over 1000 + 1 MiB are refused


@pytest.fixture
def slow_server(bundle_v1, tmp_path):
    """One worker, at most 4 calls in flight, Recommend slowed to 50 ms."""
    server = serve(bundle_v1.parent, port=0, state=tmp_path, workers=1, max_concurrent_rpcs=4,
                   limits=LIMITS, poll_seconds=0.1)
    assert server.wait_ready(10)
    model = server.holder.model
    fast = model.recommend

    def slow(query):
        time.sleep(0.05)
        return fast(query)

    model.recommend = slow
    yield server
    server.stop(0)


def counted(server, method: str) -> dict[str, float]:
    """recsys_requests_total of one method by code."""
    out = {}
    for metric in server.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "recsys_requests_total" and s.labels["method"] == method:
                out[s.labels["code"]] = s.value
    return out


def test_concurrency_flood_counted(slow_server):
    with RecommenderClient(f"127.0.0.1:{slow_server.port}", timeout=30) as client:
        calls = [client.stub.Recommend.future(pb.RecommendRequest(user_id=10, k=3), timeout=30)
                 for _ in range(40)]
        seen = Counter()
        for call in calls:
            try:
                call.result()
                seen["OK"] += 1
            except grpc.RpcError as err:
                seen[err.code().name] += 1
                assert err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "retry" in err.details()
    assert seen["RESOURCE_EXHAUSTED"] >= 20 and seen["OK"] >= 4
    assert counted(slow_server, "Recommend") == dict(seen)


def test_oversized_undecodable_unknown_counted(slow_server):
    with RecommenderClient(f"127.0.0.1:{slow_server.port}") as client:
        raw = client.channel.unary_unary("/ptmrec.v1.Recommender/EncodeItem")
        with pytest.raises(grpc.RpcError) as big:
            client.encode(text="x" * (1024 * 1024 + 2000))
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\x12\x03\xff\xfe\xfd")  # field 2 (text) with invalid UTF-8
        with pytest.raises(grpc.RpcError) as unknown:
            client.channel.unary_unary("/ptmrec.v1.Recommender/Nope")(b"")
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert counted(slow_server, "EncodeItem") == {"RESOURCE_EXHAUSTED": 1, "INVALID_ARGUMENT": 1}
    assert counted(slow_server, "unknown") == {"UNIMPLEMENTED": 1}


def test_encode_flood_refused_and_counted_while_recommend_answers(bundle_v1, tmp_path):
    from serve.encoding import EncodeLimits

    server = serve(bundle_v1.parent, port=0, state=tmp_path, workers=2, poll_seconds=0.1,
                   encode=EncodeLimits(workers=1, queue=1, max_wait=5))
    assert server.wait_ready(10)
    model = server.holder.model
    real = model.encode

    def slow(image, text):
        time.sleep(0.3)
        return real(image, text)

    model.encode = slow
    try:
        with RecommenderClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            calls = [client.stub.EncodeItem.future(pb.EncodeItemRequest(text="red shoe"),
                                                   timeout=30) for _ in range(8)]
            time.sleep(0.1)
            start = time.perf_counter()
            assert client.recommend(10, 5).items
            assert time.perf_counter() - start < 0.25     # not behind the encodes
            seen = Counter()
            for call in calls:
                try:
                    call.result()
                    seen["OK"] += 1
                except grpc.RpcError as err:
                    seen[err.code().name] += 1
        assert seen["OK"] >= 2 and seen["RESOURCE_EXHAUSTED"] >= 4
        assert seen["OK"] + seen["RESOURCE_EXHAUSTED"] == 8
        assert counted(server, "EncodeItem") == dict(seen)
    finally:
        server.stop(0)
