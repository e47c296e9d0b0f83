"""bench.h2load (bench.serve_load's h2load mode): body framing, output parsing, and error detection."""
from __future__ import annotations

import argparse
import shutil

import pytest

from bench import h2load, serve_load
from serve._gen.ptmrec.v1 import recommender_pb2 as pb
from serve.server import serve
from bench.bundle_factory import BundleSpec, write_test_bundle

H2LOAD_OUTPUT = """finished in 4.00s, 1546.00 req/s, 177.75KB/s
requests: 4638 total, 4638 started, 4638 done, 4630 succeeded, 8 failed, 0 errored, 0 timeout
status codes: 4630 2xx, 0 3xx, 0 4xx, 8 5xx
"""


def test_grpc_frame_and_bodies(tmp_path):
    body = h2load.grpc_frame(b"abc")
    assert body == b"\x00\x00\x00\x00\x03abc"
    paths = h2load.write_bodies(tmp_path, BundleSpec(n_users=50), k=7, n=4)
    assert len(paths) == 4
    requests = [pb.RecommendRequest.FromString(p.read_bytes()[5:]) for p in paths]
    assert [r.user_id for r in requests] == [0, 160, 320, 490]
    assert all(r.k == 7 for r in requests)


def test_parse_h2load_and_counters(tmp_path):
    assert h2load.parse_h2load(H2LOAD_OUTPUT) == dict(rps=1546.0, http_2xx=4630, failed=8)
    with pytest.raises(RuntimeError):
        h2load.parse_h2load("nothing useful")
    text = ('recsys_requests_total{code="OK",method="Recommend"} 12.0\n'
            'recsys_requests_total{code="INVALID_ARGUMENT",method="Recommend"} 2.0\n'
            'recsys_requests_total{code="OK",method="EncodeItem"} 5.0\n'
            'recsys_model_version 3.0\n')
    assert h2load.recommend_counts(text) == {"OK": 12.0, "INVALID_ARGUMENT": 2.0}
    assert h2load.served_version(text) == 3.0
    log = tmp_path / "log"
    log.write_text("1795398329117304\t200\t4694\n1795398329117745\t200\t1500\n")
    assert h2load.read_latencies(log).tolist() == [4.694, 1.5]
    assert serve_load.pair("4x8") == (4, 8)


@pytest.fixture
def server(tmp_path):
    """A SERVING in-process server."""
    write_test_bundle(tmp_path / "bundles", BundleSpec())
    running = serve(tmp_path / "bundles", port=0, poll_seconds=0.1, grace_seconds=0)
    assert running.wait_ready(30)
    yield f"127.0.0.1:{running.port}"
    running.stop(0)


def test_sample_status_sees_grpc_errors(server, tmp_path):
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(h2load.grpc_frame(pb.RecommendRequest(user_id=10, k=5).SerializeToString()))
    bad.write_bytes(h2load.grpc_frame(pb.RecommendRequest(user_id=10, k=5000).SerializeToString()))
    assert h2load.sample_status(server, good) == h2load.python_status(server, good) == "0"
    assert h2load.sample_status(server, bad) == h2load.python_status(server, bad) == "3"


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_run_h2load(server, tmp_path):
    bodies = h2load.write_bodies(tmp_path, BundleSpec(), k=5, n=2)
    args = argparse.Namespace(h2load_seconds=1.0, h2load_warmup=0.2)
    for _ in range(2):  # the second run must not see the first one's per-request log
        res = h2load.run_h2load(server, bodies, conns=2, streams=2, args=args)
    logged = sum(len(h2load.read_latencies(b.with_suffix(".log"))) for b in bodies)
    assert logged == res["http_2xx"]
    assert res["users"] == 2 and res["failed"] == 0
    assert res["http_2xx"] > 10 and res["rps"] > 10 and 0 < res["p50"] <= res["p99"]
