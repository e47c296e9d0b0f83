"""Starting before the database (Kubernetes): a real server process pointed at a PostgreSQL that
is not running yet waits NOT_SERVING, serves once the database starts, answers writes
UNAVAILABLE while it is down again, and gives up with a clear message after --store-wait-seconds."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest

from bench.bundle_factory import BundleSpec, probe_item, write_test_bundle
from bench.pgcluster import PgCluster, find_bin, free_port
from bench.procs import ROOT, client, start_server, stop, wait_serving


@pytest.fixture
def cold_cluster():
    """An initdb'd PostgreSQL cluster that is not started (its port is free until it is)."""
    if find_bin() is None:
        if os.environ.get("CI") == "1":
            pytest.fail("CI=1 requires PostgreSQL for the event-store tests")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    cluster = PgCluster().init()
    yield cluster
    cluster.remove()


def _code(call) -> tuple[grpc.StatusCode, str]:
    """Status code and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_server_waits_for_the_database_then_serves(tmp_path, cold_cluster):
    write_test_bundle(tmp_path, BundleSpec())
    proc, port, _ = start_server(tmp_path, "--store", cold_cluster.url(), "--poll-seconds", "0.2",
                                 "--store-wait-seconds", "0")
    try:
        c = client(port)
        time.sleep(2.0)  # a few connection attempts
        assert proc.poll() is None and c.health() == "NOT_SERVING"
        code, details = _code(lambda: c.upsert(77, *probe_item()))
        assert code == grpc.StatusCode.UNAVAILABLE and "event store" in details
        assert f"127.0.0.1:{cold_cluster.port}" in details
        cold_cluster.start()
        wait_serving(c, proc, timeout=60)
        written = c.upsert(77, *probe_item())
        assert written.event_id == 1 and c.recommend(0, 1).items[0].item_id == 77

        cold_cluster.stop()  # down again after start: writes refused, reads served
        code, details = _code(lambda: c.upsert(78, b"", "blue mug"))
        assert code == grpc.StatusCode.UNAVAILABLE and details
        assert c.recommend(0, 1).items[0].item_id == 77 and c.health() == "SERVING"
        cold_cluster.start()
        assert c.upsert(78, b"", "blue mug").event_id == 2
    finally:
        stop(proc)


def test_unreachable_database_exits_with_a_clear_message(tmp_path):
    write_test_bundle(tmp_path, BundleSpec())
    port = free_port()
    url = f"postgresql://ptmrec:s3cret@127.0.0.1:{port}/ptmrec"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "serve", "--bundles", str(tmp_path), "--port", "0",
         "--metrics-port", "-1", "--store", url, "--store-wait-seconds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert time.monotonic() - start < 30
    last = done.stderr.strip().splitlines()[-2:]
    assert any("gave up waiting for the event store after 1 s" in line
               and f"127.0.0.1:{port}" in line for line in last), done.stderr
    assert "s3cret" not in done.stderr + done.stdout
