"""The inspection page in a real headless Chromium against a live `python -m serve`.

One browser (bench.browser: the DevTools protocol on a pipe) and one server for the module. The
tests need the Debian package `chromium`; they are skipped when it is missing, except in CI (CI=1,
where .ci/run installs it), where a missing chromium is a failure. Screenshots go to a tmp dir.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.browser import Browser
from bench.bundle_factory import BundleSpec, probe_item, write_test_bundle
from tests.serve.test_ui import (MISSING_FILE, NO_IMAGE, cards, colour, encode, request,
                                 write_catalogue)

ROOT = Path(__file__).resolve().parents[2]
# (item id, loaded, naturalWidth) of each card's <img> in a section of the current page.
CARD_IMAGES = """Array.from(document.querySelectorAll('#{} figure.card img'))
  .map(img => [Number(img.closest('figure').dataset.item), img.complete, img.naturalWidth])"""
CARD_IDS = """Array.from(document.querySelectorAll('#{} figure.card'))
  .map(card => Number(card.dataset.item))"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m serve` on a demo-like bundle with a catalogue; yields (ui url, ui port)."""
    root = tmp_path_factory.mktemp("browser_server")
    catalogue = write_catalogue(root / "catalogue")
    write_test_bundle(root / "bundles", BundleSpec())
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--bundles", str(root / "bundles"), "--port", "0",
         "--metrics-port", "-1", "--ui-port", "0", "--catalogue", str(catalogue),
         "--log-level", "WARNING", "--drain-seconds", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        url = re.search(r"inspection page on (http://\S+)", proc.stdout.readline()).group(1)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        deadline = time.monotonic() + 30
        while request(port, "/")[0] == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield url.rstrip("/"), port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    with Browser(chromium, tmp_path_factory.mktemp("profile"), 1200, 900) as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def loaded_images(browser: Browser, section: str) -> dict[int, int]:
    """item id -> naturalWidth of the loaded card images in a section (fails on one not loaded)."""
    images = browser.evaluate(CARD_IMAGES.format(section))
    assert all(complete for _, complete, _ in images), images
    return {item: width for item, _, width in images}


def upload(browser: Browser, base: str, path: Path, text: str, k: int) -> int:
    """Fill the encode form as a user would (choose a file, type a text and k), submit it."""
    assert browser.goto(f"{base}/encode") == 200
    browser.set_files("form.upload input[type=file]", path)
    browser.evaluate(f"""(() => {{
        document.querySelector('form.upload input[name=text]').value = {json.dumps(text)};
        document.querySelector('form.upload input[name=k]').value = '{k}'; }})()""")
    return browser.submit("form.upload button[type=submit]")


def test_user_page_shows_k_cards_with_loaded_images(browser, server, shots):
    base, _ = server
    mark = len(browser.events)
    assert browser.goto(f"{base}/user/0") == 200
    top = browser.evaluate(CARD_IDS.format("top"))
    widths = loaded_images(browser, "top")
    with_image = [i for i in top if i not in NO_IMAGE and i != MISSING_FILE]
    assert len(top) == 10 and sorted(widths) == sorted(with_image)
    assert all(width == 64 for width in widths.values())  # the catalogue's 64 x 48 PNGs
    assert browser.errors(mark) == []
    shot = browser.screenshot(shots / "user.png")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(np.int16)
    assert len(np.unique(pixels, axis=0)) > 50
    for item in with_image[:6]:  # the first row of cards: their colours are on screen
        near = np.abs(pixels - np.array(colour(item))).max(axis=1) <= 8
        assert near.sum() > 2000, f"image of item {item} not visible"


def test_the_upload_form_shows_the_nearest_items(browser, server, shots, tmp_path):
    base, port = server
    image, text = probe_item()
    path = tmp_path / "probe.png"
    path.write_bytes(image)
    mark = len(browser.events)
    assert upload(browser, base, path, text, k=6) == 200
    assert browser.evaluate("location.pathname") == "/encode"
    nearest = browser.evaluate(CARD_IDS.format("nearest"))
    _, direct = encode(port, image, text, k=6)  # the same upload without a browser
    assert nearest == [i for i, _ in cards(direct, "nearest")] and len(nearest) == 6
    widths = loaded_images(browser, "nearest")
    assert sorted(widths) == sorted(i for i in nearest if i not in NO_IMAGE and i != MISSING_FILE)
    assert widths and all(width > 0 for width in widths.values())
    tags = browser.evaluate("document.querySelector('#nearest h2').textContent")
    assert f"image {len(image)} bytes" in tags  # the file itself went through the form
    reach = browser.evaluate("document.querySelectorAll('#reach a[href^=\"/user/\"]').length")
    assert reach > 0 and browser.errors(mark) == []
    browser.screenshot(shots / "encode.png")


def test_a_non_image_upload_shows_the_error_and_the_server_still_answers(browser, server,
                                                                         shots, tmp_path):
    base, _ = server
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    assert upload(browser, base, path, "a text", k=5) == 400
    shown = browser.evaluate("document.getElementById('message').textContent")
    assert "could not be decoded" in shown and "Traceback" not in shown
    assert browser.evaluate("document.querySelectorAll('#nearest').length") == 0
    browser.screenshot(shots / "encode_error.png")
    assert browser.goto(f"{base}/user/0") == 200
    assert len(browser.evaluate(CARD_IDS.format("top"))) == 10
