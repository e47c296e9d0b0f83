"""API keys and roles, key rotation, the anonymous-exposure rule, metrics auth and mutual TLS."""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from serve import __main__ as server_main
from serve.auth import AuthConfig, KeyFileError, parse_keys
from serve.client import RecommenderClient
from serve.server import serve
from bench.bundle_factory import probe_item

READ_KEY, WRITE_KEY, NEW_KEY = "r" * 24, "w" * 24, "n" * 24
S = grpc.StatusCode


@pytest.fixture
def keyed(bundle_v1, tmp_path):
    """A server whose key file holds one read and one write key (re-read every 50 ms)."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# roles\nread:{READ_KEY}\nwrite:{WRITE_KEY}\n")
    auth = AuthConfig(api_keys=keys, reload_seconds=0.05)
    server = serve(bundle_v1.parent, port=0, state=tmp_path, metrics_port=0, auth=auth,
                   poll_seconds=0.1)
    assert server.wait_ready(10)
    yield server, keys
    server.stop(0)


def code_of(call) -> S:
    """The status code of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def client(server, key=None, **kw) -> RecommenderClient:
    """A client of `server` sending `key`."""
    return RecommenderClient(f"127.0.0.1:{server.port}", api_key=key, **kw)


def scrape(port: int, key: str | None) -> int:
    """HTTP status of a /metrics scrape with an optional bearer key."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_keys_and_roles(keyed):
    server, _ = keyed
    with client(server) as anonymous, client(server, "x" * 24) as wrong, \
            client(server, READ_KEY) as reader, client(server, WRITE_KEY) as writer:
        assert code_of(lambda: anonymous.recommend(10, 3)) == (
            S.UNAUTHENTICATED, "missing or invalid credentials")
        assert code_of(lambda: wrong.recommend(10, 3)) == (
            S.UNAUTHENTICATED, "missing or invalid credentials")
        assert code_of(lambda: reader.upsert(77, *probe_item())) == (
            S.PERMISSION_DENIED, "permission denied")
        assert code_of(lambda: reader.delete(1))[0] == S.PERMISSION_DENIED
        assert code_of(lambda: reader.encode(*probe_item()))[0] == S.PERMISSION_DENIED
        assert len(reader.recommend(10, 3).items) == 3 and reader.info().index_items == 200
        assert writer.upsert(77, *probe_item()).index_items == 201
        assert writer.recommend(0, 1).items[0].item_id == 77
        assert anonymous.health() == "SERVING"  # health is public by default
    sample = server.metrics.registry.get_sample_value
    assert sample("recsys_requests_total", {"method": "Recommend", "code": "UNAUTHENTICATED",
                                            "arm": "none"}) == 2
    assert sample("recsys_requests_total", {"method": "UpsertItem",
                                            "code": "PERMISSION_DENIED", "arm": "none"}) == 1
    assert scrape(server.metrics_port, None) == scrape(server.metrics_port, "x" * 24) == 401
    assert scrape(server.metrics_port, READ_KEY) == 200


def test_rotated_key_file_is_picked_up(keyed):
    server, keys = keyed
    with client(server, READ_KEY) as old, client(server, NEW_KEY) as new:
        assert code_of(lambda: new.recommend(10, 3))[0] == S.UNAUTHENTICATED
        tmp = keys.with_suffix(".new")
        tmp.write_text(f"read:{NEW_KEY}\n")
        tmp.replace(keys)  # atomic rotation, as a secret mount or `mv` does
        deadline = time.monotonic() + 5
        while True:
            try:
                assert len(new.recommend(10, 3).items) == 3
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert code_of(lambda: old.recommend(10, 3))[0] == S.UNAUTHENTICATED
        keys.write_text("read:short\n")  # a broken file keeps the previous keys
        time.sleep(0.1)
        new.info()
        assert len(new.recommend(10, 3).items) == 3


def test_key_parsing():
    assert [role for _, role in parse_keys(f"read:{READ_KEY}, write:{WRITE_KEY}", "env")] == [
        "read", "write"]
    for bad in ("admin:" + READ_KEY, READ_KEY, "read:short", f"read:{READ_KEY}\nwrite:{READ_KEY}"):
        with pytest.raises(KeyFileError):
            parse_keys(bad, "keys")


def test_env_keys_and_private_health(bundle_v1, tmp_path, monkeypatch):
    monkeypatch.setenv("PTMREC_API_KEYS", f"write:{WRITE_KEY}")
    args = server_main.parse_args(["--bundles", str(bundle_v1.parent), "--no-public-health"])
    auth = server_main.auth_from_args(args)
    assert auth.has_keys() and WRITE_KEY not in repr(auth)
    server = serve(bundle_v1.parent, port=0, state=tmp_path, auth=auth, poll_seconds=0.1)
    try:
        assert server.wait_ready(10)
        with client(server) as anonymous, client(server, WRITE_KEY) as writer:
            assert code_of(anonymous.health)[0] == S.UNAUTHENTICATED
            assert writer.health() == "SERVING"
    finally:
        server.stop(0)


def test_non_loopback_without_auth_refuses(bundle_v1, tmp_path, caplog):
    with pytest.raises(RuntimeError, match="--insecure-allow-anonymous"):
        serve(bundle_v1.parent, host="0.0.0.0", port=0, state=tmp_path)
    with caplog.at_level(logging.ERROR):
        assert server_main.main(["--bundles", str(bundle_v1.parent), "--state", str(tmp_path),
                                 "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1"]) == 2
    assert "--insecure-allow-anonymous" in caplog.text
    with pytest.raises(RuntimeError, match="metrics"):
        serve(bundle_v1.parent, port=0, state=tmp_path, metrics_port=0, metrics_host="0.0.0.0")
    server = serve(bundle_v1.parent, host="0.0.0.0", port=0, state=tmp_path,
                   auth=AuthConfig(insecure_allow_anonymous=True))
    server.stop(0)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _certificate(d: Path, name: str, ca: str | None, san: str = "") -> tuple[Path, Path]:
    """An EC key and a certificate signed by the CA `ca` (self-signed CA when None)."""
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-keyout", str(key)]
    if ca is None:
        _openssl("req", "-x509", *new_key, "-days", "1", "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-out", str(cert))
        return key, cert
    csr, ext = d / f"{name}.csr", d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "extendedKeyUsage=clientAuth\n")
    _openssl("req", *new_key, "-subj", f"/CN={name}", "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(d / f"{ca}.pem"), "-CAkey",
             str(d / f"{ca}.key"), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
             "-out", str(cert))
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificates")
def test_mutual_tls(bundle_v1, tmp_path):
    _, ca = _certificate(tmp_path, "ca", None)
    _certificate(tmp_path, "other-ca", None)
    srv_key, srv_cert = _certificate(tmp_path, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    good_key, good_cert = _certificate(tmp_path, "client", "ca")
    bad_key, bad_cert = _certificate(tmp_path, "stranger", "other-ca")
    server = serve(bundle_v1.parent, host="0.0.0.0", port=0, state=tmp_path, tls_cert=srv_cert,
                   tls_key=srv_key, auth=AuthConfig(tls_client_ca=ca), poll_seconds=0.1)
    try:
        assert server.wait_ready(10)
        with client(server, tls_ca=ca, tls_cert=good_cert, tls_key=good_key) as good:
            assert len(good.recommend(10, 3).items) == 3
        with client(server, tls_ca=ca, timeout=2) as no_cert:
            assert code_of(lambda: no_cert.recommend(10, 3))[0] == S.UNAVAILABLE
        with client(server, tls_ca=ca, tls_cert=bad_cert, tls_key=bad_key, timeout=2) as bad:
            assert code_of(lambda: bad.recommend(10, 3))[0] == S.UNAVAILABLE
    finally:
        server.stop(0)
