"""A real server on a free loopback port: health, reflection, metrics, reload under load, signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from index import bundle
from serve import client as cli
from serve.client import RecommenderClient
from serve.server import serve
from bench.bundle_factory import BundleSpec, corrupt, probe_item, write_test_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def running(tmp_path):
    """A server on 127.0.0.1:<free port> watching an empty bundles directory every 0.1 s."""
    server = serve(tmp_path, port=0, metrics_port=0, poll_seconds=0.1, retry_seconds=30,
                   grace_seconds=1)
    yield server
    server.stop(0)


def scrape(port: int) -> str:
    """The Prometheus text exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_health_reflection_recommend_metrics(running, tmp_path):
    with RecommenderClient(f"127.0.0.1:{running.port}") as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            client.recommend(10, 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        write_test_bundle(tmp_path, BundleSpec())
        assert running.wait_ready(10)
        assert client.health() == client.health("ptmrec.v1.Recommender") == "SERVING"
        resp = client.recommend(10, 5)
        assert len(resp.items) == 5 and resp.model_version == 1
        vec = client.encode(*probe_item()).vector
        assert len(vec) == 16
        assert client.upsert(77, *probe_item()).index_items == 201
        assert client.recommend(0, 1).items[0].item_id == 77
        assert client.info().index_items == 201
        db = ProtoReflectionDescriptorDatabase(client.channel)
        assert "ptmrec.v1.Recommender" in db.get_services()
        methods = descriptor_pool.DescriptorPool(db).FindServiceByName("ptmrec.v1.Recommender")
        assert {m.name for m in methods.methods} >= {"Recommend", "EncodeItem", "GetModelInfo"}
    text = scrape(running.metrics_port)
    for name in ("recsys_request_duration_seconds_bucket", "recsys_requests_total",
                 "recsys_index_items 201.0", "recsys_build_info", "recsys_model_version 1.0",
                 "recsys_encode_duration_seconds_count", 'recsys_reloads_total{result="success"} 1.0',
                 "process_resident_memory_bytes"):
        assert name in text, name
    assert 'method="Recommend"' in text and 'code="UNAVAILABLE"' in text
    running.stop(0)
    status = running.health.Check(health_pb2.HealthCheckRequest(service=""), None).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reload_under_load_and_corrupt_bundle_refused(running, tmp_path):
    write_test_bundle(tmp_path, BundleSpec(seed=0))
    assert running.wait_ready(10)
    versions, errors, stop = [], [], threading.Event()

    def loop():
        with RecommenderClient(f"127.0.0.1:{running.port}") as client:
            deadline = time.monotonic() + 6
            while not stop.is_set() and time.monotonic() < deadline and len(versions) < 20_000:
                try:
                    versions.append(client.recommend(10, 10).model_version)
                except grpc.RpcError as err:
                    errors.append(err.code())

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.7)
    write_test_bundle(tmp_path, BundleSpec(seed=1))
    _wait(lambda: running.holder.model.version == 2)
    broken = write_test_bundle(tmp_path, BundleSpec(seed=2), publish=False)
    corrupt(broken)
    bundle.publish(tmp_path, broken.name, verify=False)
    _wait(lambda: 'recsys_reloads_total{result="failure"} 1.0' in scrape(running.metrics_port))
    time.sleep(0.5)
    stop.set()
    thread.join(10)
    assert errors == []
    assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
    assert versions == sorted(versions) and len(versions) > 50
    with RecommenderClient(f"127.0.0.1:{running.port}") as client:
        assert client.health() == "SERVING" and client.info().model_version == 2


def _wait(predicate, timeout: float = 10.0) -> None:
    """Poll until predicate() is true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_client_cli(running, tmp_path, capsys):
    target = ["--target", f"127.0.0.1:{running.port}", "--timeout", "5"]
    assert cli.main(target + ["health"]) == 1
    write_test_bundle(tmp_path, BundleSpec())
    assert running.wait_ready(10)
    assert cli.main(target + ["health"]) == 0
    image = tmp_path / "probe.png"
    image.write_bytes(probe_item()[0])
    assert cli.main(target + ["upsert", "--item", "77", "--image", str(image), "--text",
                              probe_item()[1]]) == 0
    assert cli.main(target + ["recommend", "--user", "0", "-k", "2"]) == 0
    assert '"item_id": "77"' in capsys.readouterr().out
    assert cli.main(target + ["delete", "--item", "77"]) == 0
    assert cli.main(target + ["delete", "--item", "77"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(target + ["info"]) == 0
    assert cli.main(["health"] + target) == 0  # global options after the subcommand too


def test_client_cli_global_options_anywhere():
    before = cli.parse_args(["--target", "h:1", "--timeout", "2", "recommend", "--user", "3"])
    after = cli.parse_args(["recommend", "--user", "3", "--target", "h:1", "--timeout", "2"])
    assert before == after and before.target == "h:1" and before.timeout == 2.0
    assert cli.parse_args(["health"]).target == "127.0.0.1:50051"


def test_main_stops_on_sigterm(tmp_path):
    write_test_bundle(tmp_path, BundleSpec())
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--bundles", str(tmp_path), "--port", "0",
         "--metrics-port", "-1", "--grace-seconds", "1", "--drain-seconds", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line + proc.stderr.read()
        port = int(line.split(":")[1].split(",")[0])
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            _wait(lambda: client.health() == "SERVING")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "received SIGTERM" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains(bundle_v1, tmp_path):
    drain, grace = 1.0, 1.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--bundles", str(bundle_v1.parent), "--state",
         str(tmp_path), "--port", "0", "--metrics-port", "-1", "--drain-seconds", str(drain),
         "--grace-seconds", str(grace), "--workers", "4"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"})
    results, stop = [], threading.Event()
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line + proc.stderr.read()
        target = f"127.0.0.1:{line.split(':')[1].split(',')[0]}"
        with RecommenderClient(target, timeout=2) as probe:
            _wait(lambda: probe.health() == "SERVING")

            def load():
                with RecommenderClient(target, timeout=2) as client:
                    while not stop.is_set():
                        t = time.monotonic()
                        try:
                            client.recommend(10, 5)
                            results.append((t, "OK"))
                        except grpc.RpcError as err:
                            results.append((t, err.code().name))

            threads = [threading.Thread(target=load) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            while probe.health() != "NOT_SERVING":
                pass
            flipped = time.monotonic() - signalled
            assert flipped < 0.1
            assert proc.wait(timeout=drain + grace + 5) == 0
            exited = time.monotonic() - signalled
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    during = [code for t, code in results if signalled <= t < signalled + drain - 0.2]
    assert len(during) > 20 and set(during) == {"OK"}, set(during)
    print(f"health NOT_SERVING after {flipped * 1000:.1f} ms, {len(during)} calls OK during the "
          f"drain, exit after {exited:.2f} s")
    # the upper bound leaves 3 s for interpreter exit on a loaded machine; the defaults (drain 2 s,
    # grace 5 s) would take 7 s
    assert drain <= exited < drain + grace + 3.0


def test_tls(tmp_path):
    openssl = subprocess.run(["which", "openssl"], capture_output=True, text=True).stdout.strip()
    if not openssl:
        pytest.skip("openssl not available to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    write_test_bundle(tmp_path / "b", BundleSpec())
    server = serve(tmp_path / "b", port=0, tls_cert=cert, tls_key=key, poll_seconds=0.1)
    try:
        assert server.wait_ready(10)
        with RecommenderClient(f"127.0.0.1:{server.port}", tls_ca=cert) as client:
            assert client.health() == "SERVING" and len(client.recommend(10, 3).items) == 3
        with RecommenderClient(f"127.0.0.1:{server.port}", timeout=1) as plain:
            with pytest.raises(grpc.RpcError):
                plain.health()
    finally:
        server.stop(0)
