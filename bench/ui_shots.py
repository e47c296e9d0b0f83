"""Screenshots of the inspection page for docs/, taken in headless Chromium against a live server.

    python -m bench.ui_shots --bundles runs/demo/bundles --data runs/demo/data --out docs

Starts `python -m serve` on the bundles with the dataset as catalogue, opens user 0's page, then
uploads the image and text of that user's top item through the encode form (as `make demo` does
over gRPC) and writes OUT/ui-user.png and OUT/ui-encode.png (palette PNGs, 1200 px wide). Prints
the items shown and any console error; exit 1 when the page logged one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from bench.browser import Browser, find_chromium
from serve.demo import read_items

ROOT = Path(__file__).resolve().parents[1]
CARD_IDS = ("Array.from(document.querySelectorAll('#{} figure.card'))"
            ".map(card => Number(card.dataset.item))")
UNLOADED = ("Array.from(document.querySelectorAll('figure.card img'))"
            ".filter(img => !(img.complete && img.naturalWidth > 0)).length")


def start_server(bundles: Path, data: Path) -> tuple[subprocess.Popen, str]:
    """`python -m serve` with the page on a free port, waited until a bundle is loaded."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--bundles", str(bundles), "--port", "0",
         "--metrics-port", "-1", "--ui-port", "0", "--catalogue", str(data),
         "--log-level", "WARNING", "--drain-seconds", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    found = re.search(r"inspection page on (http://\S+)", proc.stdout.readline() or "")
    if found is None:
        proc.kill()
        raise SystemExit("the server did not start (see its log above)")
    url = found.group(1).rstrip("/")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/", timeout=5).close()
            break
        except urllib.error.HTTPError:  # 503 until the bundle is loaded
            time.sleep(0.2)
    return proc, url


def save(browser: Browser, path: Path, height: int) -> None:
    """The top `height` pixels of the viewport as a 256-colour PNG."""
    raw = path.with_suffix(".raw.png")
    browser.screenshot(raw)
    Image.open(raw).convert("RGB").crop((0, 0, browser.width, height)).quantize(256).save(
        path, optimize=True)
    raw.unlink()
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def shoot(browser: Browser, url: str, data: Path, out: Path, height: int) -> None:
    """User 0's page, then the encode form with its top item's content uploaded."""
    assert browser.goto(f"{url}/user/0") == 200, "user 0's page did not load"
    top = browser.evaluate(CARD_IDS.format("top"))
    print(f"user 0, top {len(top)}: {top}; images not loaded: {browser.evaluate(UNLOADED)}")
    save(browser, out / "ui-user.png", height)
    image, text = read_items(data)[top[0]]
    assert browser.goto(f"{url}/encode") == 200, "the encode page did not load"
    if image:
        browser.set_files("form.upload input[type=file]", data / image)
    browser.evaluate(f"document.querySelector('form.upload input[name=text]').value = "
                     f"{json.dumps(text)}")
    status = browser.submit("form.upload button[type=submit]")
    nearest = browser.evaluate(CARD_IDS.format("nearest"))
    reach = browser.evaluate("document.querySelector('#reach h2 .tag').textContent")
    print(f"upload of item {top[0]}'s image and text: status {status}, nearest {nearest}, "
          f"users who would get it: {reach}; images not loaded: {browser.evaluate(UNLOADED)}")
    save(browser, out / "ui-encode.png", height)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset directory (items.tsv)")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--height", type=int, default=760, help="pixels kept from the top")
    args = p.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        p.error("chromium is not installed")
    args.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args.bundles, args.data)
    try:
        with tempfile.TemporaryDirectory() as profile, \
                Browser(binary, Path(profile), 1200, max(args.height, 900)) as browser:
            shoot(browser, url, args.data.resolve(), args.out, args.height)
            errors = browser.errors()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    for error in errors:
        print(f"console error: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
