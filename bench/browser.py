"""Headless Chromium driven over the Chrome DevTools Protocol on a pipe, without extra packages.

    python -m bench.browser PAGE [--screenshot OUT.png] [--size 1200x900] [--scale 0.5] [--palette]

Opens PAGE (a URL or an HTML file) and prints the console errors and uncaught exceptions it
raised (exit 1 if any) and, with --screenshot, writes a PNG. Chromium is started with
`--remote-debugging-pipe`: it reads commands from fd 3 and writes answers to fd 4, each a JSON
message ended by a NUL byte; no port is opened. Used by the browser test
(tests/serve/test_ui_browser.py) and for the screenshots in docs/.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-pipe")
# fd 3 <- our commands (the child's stdin), fd 4 -> its answers (the child's stdout).
PIPE_SHELL = 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null'


class BrowserError(RuntimeError):
    """Chromium answered a command with an error, timed out, or exited."""


def find_chromium() -> str | None:
    """The chromium binary on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium process with one page (tab), driven synchronously."""

    def __init__(self, binary: str, profile: Path, width: int = 1200, height: int = 900,
                 timeout: float = 30.0):
        profile.mkdir(parents=True, exist_ok=True)
        self.timeout, self.width, self.height = timeout, width, height
        self._log = open(profile / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", PIPE_SHELL, binary, *FLAGS, f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._buf, self._next_id, self.events = b"", 0, []
        self.session = None
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target,
                                     flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # -- protocol ------------------------------------------------------------------------------
    def _read(self, deadline: float) -> dict:
        """The next message from chromium (waits until deadline)."""
        fd = self.proc.stdout.fileno()
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for chromium")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium exited (code {self.proc.poll()}); "
                                       f"see {self._log.name}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, **params) -> dict:
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            if "method" in answer:
                self.events.append(answer)

    def wait_event(self, method: str, since: int = 0) -> dict:
        """The first event named method at or after position since in self.events."""
        deadline = time.monotonic() + self.timeout
        while True:
            for event in self.events[since:]:
                if event["method"] == method:
                    return event
            since = len(self.events)
            answer = self._read(deadline)
            if "method" in answer:
                self.events.append(answer)

    # -- page ----------------------------------------------------------------------------------
    def _until_loaded(self, mark: int) -> int:
        """Wait for the page's load event after mark; the main document's HTTP status (0: none)."""
        self.wait_event("Page.loadEventFired", mark)
        statuses = [e["params"]["response"]["status"] for e in self.events[mark:]
                    if e["method"] == "Network.responseReceived"
                    and e["params"].get("type") == "Document"]
        return statuses[-1] if statuses else 0

    def goto(self, url: str) -> int:
        """Open url and wait until it has loaded (images included); the document's status."""
        mark = len(self.events)
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")
        return self._until_loaded(mark)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails'].get('text')}")
        return answer["result"].get("value")

    def set_files(self, selector: str, *paths: Path) -> None:
        """Choose files in the <input type=file> matching selector, as a user would."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise BrowserError(f"no element matches {selector!r}")
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(Path(p).resolve())
                                                               for p in paths])

    def submit(self, button: str) -> int:
        """Click the button matching selector and wait for the page it leads to; its status."""
        mark = len(self.events)
        self.evaluate(f"document.querySelector({json.dumps(button)}).click()")
        return self._until_loaded(mark)

    def screenshot(self, path: Path, scale: float = 1.0) -> Path:
        """A PNG of the viewport (scale < 1 shrinks it, e.g. for docs)."""
        clip = {"x": 0, "y": 0, "width": self.width, "height": self.height, "scale": scale}
        data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def errors(self, since: int = 0) -> list[str]:
        """Console errors, uncaught exceptions and failed loads reported after events[since]."""
        out = []
        for event in self.events[since:]:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append(details.get("exception", {}).get("description") or details["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description")))
                                    for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"{params['entry']['text']} {params['entry'].get('url', '')}".strip())
        return out

    def close(self) -> None:
        """Ask chromium to exit; kill it if it does not within 10 s."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"id": 0, "method": "Browser.close"}).encode()
                                      + b"\0")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._log):
            stream.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", help="a URL or an HTML file")
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--size", default="1200x900", help="viewport WIDTHxHEIGHT")
    parser.add_argument("--scale", type=float, default=1.0, help="screenshot scale")
    parser.add_argument("--palette", action="store_true",
                        help="write the screenshot as a 256-colour PNG (smaller, for docs)")
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        parser.error("chromium is not installed")
    url = args.page if "://" in args.page else Path(args.page).resolve().as_uri()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as profile, \
            Browser(binary, Path(profile), width, height) as browser:
        status = browser.goto(url)
        if args.screenshot:
            browser.screenshot(args.screenshot, args.scale)
        errors = browser.errors()
    if args.screenshot and args.palette:
        from PIL import Image

        Image.open(args.screenshot).convert("RGB").quantize(256).save(args.screenshot,
                                                                      optimize=True)
    print(f"{url}: status {status or 'n/a'}, {len(errors)} console error(s)")
    for error in errors:
        print(f"  {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
