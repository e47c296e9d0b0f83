"""The inspection page over HTTP against a real server (in a browser: test_ui_browser.py)."""
from __future__ import annotations

import colorsys
import http.client
import io
import os
import re
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.catalogue import Catalogue, CatalogueError
from serve.client import RecommenderClient
from serve.server import serve
from serve.views import MAX_SCAN_USERS
from bench.bundle_factory import BundleSpec, probe_item, write_test_bundle
from tests.serve.conftest import SMALL_LIMITS

FIRST_ITEM, N_ITEMS = 1000, 200          # BundleSpec's item ids
NO_IMAGE = {1003, 1017}                   # listed without an image
MISSING_FILE = 1005                       # listed with an image file that does not exist
XSS_ITEM = 1011
XSS_TEXT = '<script>alert("x")</script><img src=x onerror=alert(1)>'
READ_KEY, WRITE_KEY = "r" * 8 + "ead-key-0123456789", "w" * 8 + "rite-key-0123456789"


def colour(item: int) -> tuple[int, int, int]:
    """A saturated colour per item (12 hues), so a screenshot shows which images loaded."""
    r, g, b = colorsys.hsv_to_rgb((item % 12) / 12, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def solid_png(rgb: tuple[int, int, int], size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_catalogue(root: Path) -> Path:
    """items.tsv for every bundle item with real PNGs, a few without an image, one XSS text."""
    (root / "images").mkdir(parents=True)
    lines = ["itemID\ttext\timage"]
    for item in range(FIRST_ITEM, FIRST_ITEM + N_ITEMS):
        text = XSS_TEXT if item == XSS_ITEM else f"item {item} in colour {colour(item)}"
        image = "" if item in NO_IMAGE else f"images/{item}.png"
        if item not in NO_IMAGE and item != MISSING_FILE:
            (root / image).write_bytes(solid_png(colour(item)))
        lines.append(f"{item}\t{text}\t{image}")
    (root / "items.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def catalogue_dir(tmp_path_factory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("catalogue"))


def start(bundles: Path, catalogue: Path | None, **options):
    """A server with the page on a free port, waited until SERVING."""
    running = serve(bundles, port=0, ui_port=0, catalogue=catalogue, poll_seconds=0.1,
                    grace_seconds=0, **options)
    assert running.wait_ready(20)
    return running


@pytest.fixture(scope="module")
def live(tmp_path_factory, catalogue_dir):
    """A shared server (tests using it must not mutate it)."""
    bundles = tmp_path_factory.mktemp("bundles")
    write_test_bundle(bundles, BundleSpec())
    running = start(bundles, catalogue_dir)
    yield running
    running.stop(0)


def request(port: int, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request, redirects not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def page(port: int, path: str, status: int = 200, **kw) -> str:
    code, _, body = request(port, path, **kw)
    assert code == status, body.decode()[:2000]
    return body.decode()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, dict]:
    """A multipart/form-data body and its headers, as a browser sends it."""
    boundary = uuid.uuid4().hex
    out = []
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f'{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                   f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                   .encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def cards(html: str, section: str) -> list[tuple[int, float | None]]:
    """(item id, score) of the cards inside <section id=section>."""
    body = re.search(rf'<section id="{section}"[^>]*>(.*?)</section>', html, re.S).group(1)
    return [(int(i), float(s) if s else None) for i, s in
            re.findall(r'<figure class="card[^"]*" data-item="(\d+)"(?: data-score="([^"]+)")?',
                       body)]


def message(html: str) -> str:
    return re.search(r'id="message">([^<]*)<', html).group(1)


def encode(port: int, image: bytes, text: str, k: int = 5) -> tuple[int, str]:
    body, headers = multipart({"text": text, "k": str(k)}, {"image": ("x.png", image)})
    code, _, out = request(port, "/encode", "POST", body, headers)
    return code, out.decode()


# -- pages ---------------------------------------------------------------------------------------
def test_front_page_shows_the_bundle(live):
    html = page(live.ui_port, "/")
    assert "Bundle v1" in html and "<td>50</td>" in html and 'action="/user"' in html
    assert 'action="/item"' in html and 'href="/encode"' in html


def test_user_page_cards_match_recommend(live):
    html = page(live.ui_port, "/user/10?k=7")
    with RecommenderClient(f"127.0.0.1:{live.port}") as client:
        resp = client.recommend(10, 7)
    top = cards(html, "top")
    assert [i for i, _ in top] == [it.item_id for it in resp.items]
    np.testing.assert_allclose([s for _, s in top], [it.score for it in resp.items], rtol=1e-5)
    assert 'data-source="user_vector"' in html and 'data-version="1"' in html
    assert '<span class="tag">user vector</span>' in html and "bundle v1" in html
    model = live.holder.model
    history = [i for i, _ in cards(html, "history")]
    assert history == model.seen_items(model.user_row(10)).tolist() and len(history) == 5
    for item, _ in top:
        if item in NO_IMAGE or item == MISSING_FILE:
            assert f'<img src="/image/{item}"' not in html
        else:
            assert f'<img src="/image/{item}"' in html
            assert f"item {item} in colour" in html


def test_forms_redirect_to_the_canonical_page(live):
    code, headers, _ = request(live.ui_port, "/user?id=20&k=3")
    assert code == 303 and headers["location"] == "/user/20?k=3"
    assert len(cards(page(live.ui_port, headers["location"]), "top")) == 3


def test_item_page_shows_its_nearest_items(live):
    html = page(live.ui_port, "/item/1042?k=6")
    model = live.holder.model
    vec = model.item_vector(1042)
    vectors = model.index.reconstruct_batch(np.arange(FIRST_ITEM, FIRST_ITEM + N_ITEMS))
    order = np.argsort(-(vectors @ vec), kind="stable")
    expected = [FIRST_ITEM + int(j) for j in order if FIRST_ITEM + int(j) != 1042][:6]
    assert [i for i, _ in cards(html, "nearest")] == expected
    assert [i for i, _ in cards(html, "item")] == [1042] and "item 1042 in colour" in html


def test_images_and_placeholders(live, catalogue_dir):
    code, headers, body = request(live.ui_port, "/image/1042")
    assert code == 200 and headers["content-type"] == "image/png"
    assert body == (catalogue_dir / "images/1042.png").read_bytes()
    for item in (*NO_IMAGE, MISSING_FILE, 77777):
        code, headers, body = request(live.ui_port, f"/image/{item}")
        assert code == 404 and headers["content-type"] == "image/svg+xml" and b"no image" in body
    html = page(live.ui_port, f"/item/{MISSING_FILE}")
    assert '<svg class="placeholder"' in html


def test_xss_in_an_item_text_is_escaped(live):
    html = page(live.ui_port, f"/item/{XSS_ITEM}")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "<script" not in html and "<img src=x" not in html
    _, headers, _ = request(live.ui_port, f"/item/{XSS_ITEM}")
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path, status, text", [
    ("/user/99999", 404, "user 99999 is not in bundle v1"),
    ("/item/5", 404, "item 5 is neither in the index"),
    ("/user/abc", 400, "user id must be a non-negative integer"),
    ("/user/10?k=0", 400, "k must be in 1..1000, got 0"),
    ("/user/10?k=1001", 400, "k must be in 1..1000, got 1001"),
    ("/user/10?k=ten", 400, "k must be a non-negative integer"),
    ("/item?id=-3", 400, "item id must be a non-negative integer, got -3"),
    ("/nowhere", 404, "there is no page at /nowhere"),
])
def test_bad_input_is_a_page_with_the_right_status(live, path, status, text):
    html = page(live.ui_port, path, status)
    assert text in message(html).replace("&#39;", "'") and "Traceback" not in html


def test_path_traversal_is_refused(live, catalogue_dir):
    secret = catalogue_dir.parent / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nSECRET")
    for path in ("/image/..%2Fsecret.png", "/image/../secret.png", "/image/%2e%2e/secret.png",
                 "/image/1042/../../secret.png", "/image//etc/passwd"):
        code, _, body = request(live.ui_port, path)
        assert code in (400, 404) and b"SECRET" not in body and b"root:" not in body, path


def test_catalogue_refuses_paths_outside_its_directory(tmp_path):
    root = tmp_path / "cat"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(solid_png((1, 2, 3)))
    (root / "items.tsv").write_text("itemID\ttext\timage\n1\tfine\t\n2\tbad\t../outside.png\n")
    with pytest.raises(CatalogueError, match=r"items.tsv:3: image path '../outside.png' is "
                                             r"outside the catalogue directory"):
        Catalogue.load(root)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "items.tsv").write_text("itemID\ttext\timage\n1\tvia a link\tlink.png\n")
    with pytest.raises(CatalogueError, match="items.tsv:2"):
        Catalogue.load(root)
    (root / "link.png").unlink()
    (root / "link.png").write_bytes(solid_png((1, 2, 3)))
    cat = Catalogue.load(root)
    assert cat.image(1)[1] == "image/png"
    (root / "link.png").unlink()
    (root / "link.png").symlink_to(tmp_path / "outside.png")  # swapped after loading
    assert cat.image(1) is None and not cat.has_image(1)


@pytest.mark.parametrize("text, error", [
    ("itemID\ttext\n1\tno image column\n", r"items.tsv:1: header lacks column\(s\) image"),
    ("itemID\ttext\timage\nx\tt\t\n", r"items.tsv:2: itemID is not an integer: 'x'"),
    ("itemID\ttext\timage\n1\ta\t\n1\tb\t\n", r"items.tsv:3: duplicate itemID 1"),
    ("itemID\ttext\timage\n1\ta\tb\tc\n", r"items.tsv:2: expected 3 tab-separated fields"),
])
def test_catalogue_errors_name_file_and_line(tmp_path, text, error):
    (tmp_path / "items.tsv").write_text(text)
    with pytest.raises(CatalogueError, match=error):
        Catalogue.load(tmp_path)


def test_catalogue_svg_and_non_images_are_not_served(tmp_path):
    (tmp_path / "a.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>')
    (tmp_path / "b.png").write_text("not a png")
    (tmp_path / "items.tsv").write_text("itemID\ttext\timage\n1\tsvg\ta.svg\n2\tfake\tb.png\n")
    cat = Catalogue.load(tmp_path)
    assert cat.image(1) is None and cat.image(2) is None


# -- encode --------------------------------------------------------------------------------------
def test_encode_upload_shows_nearest_items(live):
    image, text = probe_item()
    code, html = encode(live.ui_port, image, text, k=5)
    assert code == 200, html
    with RecommenderClient(f"127.0.0.1:{live.port}") as client:
        vec = np.array(client.encode(image, text).vector, dtype=np.float32)
    model = live.holder.model
    expected = model.nearest(vec, 5).item_ids.tolist()
    assert [i for i, _ in cards(html, "nearest")] == expected
    assert 'id="reach"' in html and live.holder.model.n_items == N_ITEMS  # nothing written


def test_users_who_would_get_it_match_a_real_upsert(tmp_path, catalogue_dir):
    write_test_bundle(tmp_path, BundleSpec())
    running = start(tmp_path, catalogue_dir)
    try:
        image, text = probe_item()
        code, html = encode(running.ui_port, image, text, k=10)
        assert code == 200
        section = re.search(r'<section id="reach"[^>]*>(.*?)</section>', html, re.S).group(1)
        shown = [int(u) for u in re.findall(r'href="/user/(\d+)"', section)]
        with RecommenderClient(f"127.0.0.1:{running.port}") as client:
            client.upsert(5000, image, text)
            users = running.holder.model.user_ids.tolist()
            actual = [u for u in users if 5000 in [it.item_id for it in
                                                   client.recommend(u, 10).items]]
        assert len(users) <= MAX_SCAN_USERS and shown == actual and 0 in actual
    finally:
        running.stop(0)


@pytest.mark.parametrize("fields, files, status, text", [
    ({"text": ""}, {"image": ("a.png", b"")}, 400, "an item needs an image or a non-empty text"),
    ({"text": "x"}, {"image": ("a.txt", b"this is not an image")}, 400, "could not be decoded"),
    ({"text": "x", "k": "0"}, {}, 400, "k must be in 1..1000"),
    ({"text": "x" * 600}, {}, 413, "more than the limit of 500"),
])
def test_bad_uploads(tmp_path, catalogue_dir, fields, files, status, text):
    write_test_bundle(tmp_path, BundleSpec())
    running = start(tmp_path, catalogue_dir, limits=SMALL_LIMITS)
    try:
        body, headers = multipart(fields, files)
        assert text in message(page(running.ui_port, "/encode", status, method="POST", body=body,
                                    headers=headers))
        page(running.ui_port, "/user/10")  # still serving
    finally:
        running.stop(0)


def test_malformed_and_oversized_bodies(live):
    assert "multipart/form-data" in message(page(
        live.ui_port, "/encode", 400, method="POST", body=b"text=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"}))
    limit = 9 * 1024 * 1024  # the default 8 MiB image limit + 1 MiB
    code, _, body = request(live.ui_port, "/encode", "POST", b"x" * (limit + 1),
                            {"Content-Type": "multipart/form-data; boundary=b"})
    assert code == 413 and b"more than the limit" in body
    assert "read-only" in message(page(live.ui_port, "/user/10", 405, method="POST", body=b""))
    page(live.ui_port, "/")


def test_the_page_follows_hot_reload_and_stops_with_the_server(tmp_path, catalogue_dir):
    write_test_bundle(tmp_path, BundleSpec())
    running = start(tmp_path, catalogue_dir)
    port = running.ui_port
    assert "Bundle v1" in page(port, "/")
    write_test_bundle(tmp_path, BundleSpec(seed=3))
    deadline = time.monotonic() + 20
    while running.holder.model.version != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    html = page(port, "/user/10")
    assert "Bundle v2" in page(port, "/") and 'data-version="2"' in html
    running.stop(0)
    with pytest.raises(OSError):
        request(port, "/")


def test_before_a_bundle_the_page_says_so(tmp_path):
    running = serve(tmp_path, port=0, ui_port=0, poll_seconds=0.1, grace_seconds=0)
    try:
        assert "no bundle is loaded yet" in message(page(running.ui_port, "/", 503))
    finally:
        running.stop(0)


# -- authentication ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tmp_path_factory, catalogue_dir):
    """A server with API keys (one read, one write key)."""
    root = tmp_path_factory.mktemp("guarded")
    keys = root / "keys.txt"
    keys.write_text(f"read:{READ_KEY}\nwrite:{WRITE_KEY}\n")
    write_test_bundle(root / "bundles", BundleSpec())
    from serve.auth import AuthConfig

    running = start(root / "bundles", catalogue_dir, auth=AuthConfig(api_keys=keys))
    yield running
    running.stop(0)


def test_without_a_key_the_page_asks_for_one(guarded):
    for path in ("/", "/user/10", "/item/1042", "/encode"):
        code, headers, body = request(guarded.ui_port, path)
        assert code == 401 and b'action="/login"' in body and b"bundle v1" not in body, path
    code, _, body = request(guarded.ui_port, "/image/1042")
    assert code == 401 and not body.startswith(b"\x89PNG")
    code, _, _ = request(guarded.ui_port, "/",
                         headers={"Authorization": "Bearer wrong-key-1234567"})
    assert code == 401
    body, headers = multipart({"text": "x"}, {})
    assert request(guarded.ui_port, "/encode", "POST", body, headers)[0] == 401


def test_a_read_key_as_bearer_header(guarded):
    for key in (READ_KEY, WRITE_KEY):
        html = page(guarded.ui_port, "/user/10", headers={"Authorization": f"Bearer {key}"})
        assert len(cards(html, "top")) == 10


def test_login_sets_a_session_cookie_and_logout_ends_it(guarded):
    port = guarded.ui_port
    code, _, body = request(port, "/login", "POST", b"key=nope&next=/user/10",
                            {"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 401 and b"that key is not valid" in body
    code, headers, _ = request(port, "/login", "POST",
                               f"key={READ_KEY}&next=/user/10".encode(),
                               {"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 303 and headers["location"] == "/user/10"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and READ_KEY not in cookie
    jar = {"Cookie": cookie.split(";")[0]}
    assert len(cards(page(port, "/user/10", headers=jar), "top")) == 10
    assert request(port, "/image/1042", headers=jar)[0] == 200
    code, headers, _ = request(port, "/logout", "POST", b"", jar)
    assert code == 303 and "Max-Age=0" in headers["set-cookie"]
    assert request(port, "/user/10", headers=jar)[0] == 401


def test_login_does_not_redirect_off_site(guarded):
    _, headers, _ = request(guarded.ui_port, "/login", "POST",
                            f"key={READ_KEY}&next=//evil.example/".encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})
    assert headers["location"] == "/"


def test_an_exposed_page_needs_keys(tmp_path):
    with pytest.raises(RuntimeError, match="inspection page on 0.0.0.0 without a read key.*"
                                           "--insecure-allow-anonymous"):
        serve(tmp_path, port=0, ui_port=0, ui_host="0.0.0.0")
    from serve.auth import AuthConfig, check_exposure

    check_exposure(AuthConfig(insecure_allow_anonymous=True), "127.0.0.1", None, "0.0.0.0")
    check_exposure(AuthConfig(api_keys_text=f"read:{READ_KEY}"), "127.0.0.1", None, "0.0.0.0")


def test_a_bad_catalogue_stops_the_start(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "items.tsv").write_text("itemID\ttext\timage\n1\tx\t/etc/passwd\n")
    with pytest.raises(RuntimeError, match="items.tsv:2: image path '/etc/passwd' is outside"):
        serve(tmp_path, port=0, ui_port=0, catalogue=tmp_path / "cat")


def test_a_key_rotated_out_ends_its_sessions(tmp_path, catalogue_dir):
    from serve.auth import AuthConfig

    keys = tmp_path / "keys.txt"
    keys.write_text(f"read:{READ_KEY}\n")
    write_test_bundle(tmp_path / "bundles", BundleSpec())
    running = start(tmp_path / "bundles", catalogue_dir,
                    auth=AuthConfig(api_keys=keys, reload_seconds=0.05))
    try:
        _, headers, _ = request(running.ui_port, "/login", "POST", f"key={READ_KEY}".encode(),
                                {"Content-Type": "application/x-www-form-urlencoded"})
        jar = {"Cookie": headers["set-cookie"].split(";")[0]}
        assert request(running.ui_port, "/", headers=jar)[0] == 200
        keys.write_text(f"read:{WRITE_KEY}\n")
        os.utime(keys, ns=(time.time_ns() + 10**9,) * 2)
        time.sleep(0.2)
        assert request(running.ui_port, "/", headers=jar)[0] == 401
    finally:
        running.stop(0)


def test_demo_waits_for_enter_only_when_interactive(monkeypatch):
    from serve import demo

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setenv("CI", "1")
    assert not demo.interactive()
    monkeypatch.delenv("CI")
    assert demo.interactive()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert not demo.interactive()
