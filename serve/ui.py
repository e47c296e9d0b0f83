"""The inspection page: server-rendered HTML over the live bundle, read-only.

    python -m serve --bundles DIR --ui-port 8080 [--ui-host 127.0.0.1] [--catalogue DATA_DIR]

Pages: `/` (bundle, counts, user and item forms), `/user/ID?k=10` (training history, recorded
interactions and the current top-k as Recommend answers it), `/item/ID` (the item and its nearest
items), `/encode` (upload an image and a text: their nearest items and the users who would get
them; nothing is written), `/image/ID` (the catalogue image). Every request reads the holder's
model once, so a hot swap shows at the next page. Templates are jinja2 with autoescape on, the
pages carry a strict Content-Security-Policy and no script.

Authentication follows the server's API keys (serve.auth): without keys the page is anonymous
(and loopback only, unless --insecure-allow-anonymous; see check_exposure); with keys every page
needs a read (or write) key, either as `Authorization: Bearer KEY` (curl, scripts) or through
`/login`, a form that takes the key and sets an HttpOnly, SameSite=Strict session cookie. A
session lasts 12 hours or until the key leaves the key file. Errors are pages with the status of
the ServeError (400, 404, 413, ...); anything unexpected is a 500 page with a reference that is
also logged, never a traceback.
"""
from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from serve import views
from serve.catalogue import Catalogue
from serve.errors import InvalidArgument, ServeError, Unavailable
from serve.forms import body_length, parse_multipart, parse_urlencoded
from serve.limits import MIB, Limits, check_item
from serve.metrics import Metrics
from serve.reload import ModelHolder

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "ptmrec_ui"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1024
MAX_IN_FLIGHT = 16
DEFAULT_K = 10
STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413,
          "FAILED_PRECONDITION": 409, "ALREADY_EXISTS": 409, "UNAVAILABLE": 503}
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
PLACEHOLDER_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120" '
                   b'viewBox="0 0 160 120"><rect width="160" height="120" fill="#e5e7eb"/>'
                   b'<text x="80" y="66" font-family="sans-serif" font-size="14" fill="#6b7280" '
                   b'text-anchor="middle">no image</text></svg>')


class Sessions:
    """Login sessions: a random token per login, mapped to the key it was opened with; a key
    that is no longer accepted (rotated out of the key file) ends its sessions."""

    def __init__(self, allowed: Callable[[str], bool], seconds: float = SESSION_SECONDS):
        self.allowed, self.seconds = allowed, seconds
        self._open: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def open(self, key: str) -> str | None:
        """A new session token for an accepted key, else None."""
        if not key or not self.allowed(key):
            return None
        token = secrets.token_urlsafe(32)
        with self._lock:
            if len(self._open) >= MAX_SESSIONS:
                self._open.pop(min(self._open, key=lambda t: self._open[t][1]))
            self._open[token] = (key, time.monotonic() + self.seconds)
        return token

    def valid(self, token: str | None) -> bool:
        """Whether a token names a live session whose key is still accepted."""
        with self._lock:
            key, expires = self._open.get(token or "", ("", 0.0))
        if time.monotonic() < expires and self.allowed(key):
            return True
        self.close(token)
        return False

    def close(self, token: str | None) -> None:
        """End a session (logout)."""
        with self._lock:
            self._open.pop(token or "", None)


class App:
    """What the request handler needs: the live model, the catalogue, limits and auth."""

    def __init__(self, holder: ModelHolder, catalogue: Catalogue, limits: Limits,
                 metrics: Metrics, allowed: Callable[[str], bool] | None = None):
        self.holder, self.catalogue, self.limits, self.metrics = holder, catalogue, limits, metrics
        self.allowed = allowed
        self.sessions = None if allowed is None else Sessions(allowed)
        self.slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self.env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                               undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.globals["source_label"] = lambda s: views.SOURCE_LABELS.get(s, s)

    def model(self):
        """The live model, or Unavailable before the first bundle."""
        model = self.holder.model
        if model is None:
            raise Unavailable("no bundle is loaded yet; the page works once the server is "
                              "SERVING")
        return model

    def render(self, template: str, public: bool = False, **context) -> bytes:
        """A page as UTF-8 bytes (`public`: for a visitor not logged in, no bundle version)."""
        model = None if public else self.holder.model
        return self.env.get_template(template).render(
            auth=self.sessions is not None and not public,
            live_version=None if model is None else model.version, **context).encode("utf-8")


def _int(value: str | None, what: str, default: int | None = None) -> int:
    """A non-negative integer from a path or form field (InvalidArgument otherwise)."""
    if value in (None, "") and default is not None:
        return default
    try:
        out = int(str(value).strip())
    except ValueError:
        raise InvalidArgument(f"{what} must be a non-negative integer, got {value!r}") from None
    if out < 0:
        raise InvalidArgument(f"{what} must be a non-negative integer, got {out}")
    return out


def _safe_next(target: str) -> str:
    """A same-site path to go back to after login (anything else: the front page)."""
    ok = target.startswith("/") and not target.startswith(("//", "/\\"))
    return target if ok else "/"


class Handler(BaseHTTPRequestHandler):
    """One request: authorize, route, render; errors become pages."""

    server_version, sys_version = "ptmrec-ui", ""
    timeout = 30  # seconds a slow client may take per read
    app: App

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """Pages and images."""
        self._run(self._get)

    def do_POST(self) -> None:  # noqa: N802
        """The encode form, login and logout."""
        self._run(self._post)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _run(self, route: Callable) -> None:
        """Run a route under the in-flight bound, mapping errors to pages."""
        if not self.app.slots.acquire(blocking=False):
            self._error(503, "too many requests at once; retry in a moment")
            return
        try:
            url = urlsplit(self.path)
            if self._authorized(url.path):
                route(url.path, {k: v[0] for k, v in parse_qs(url.query).items()})
        except ServeError as err:
            self._error(STATUS.get(err.code, 500), str(err))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception:  # noqa: BLE001 - a page error must never kill the server
            ref = uuid.uuid4().hex[:12]
            log.exception("inspection page %s failed (ref %s)", self.path[:200], ref)
            self._error(500, f"internal error (ref {ref}); see the server log")
        finally:
            self.app.slots.release()

    # -- routes --------------------------------------------------------------------------------
    def _get(self, path: str, args: dict[str, str]) -> None:
        app, parts = self.app, path.strip("/").split("/")
        k = _int(args.get("k"), "k", DEFAULT_K)
        if path == "/":
            model = app.model()
            self._page(200, "index.html", o=views.overview(model, app.catalogue, app.holder.name))
        elif path == "/style.css":
            self._send(200, (TEMPLATES / "style.css").read_bytes(), "text/css", cache=True)
        elif path == "/login":
            self._page(200, "login.html", public=True, next=_safe_next(args.get("next", "/")),
                       message="")
        elif path == "/encode":
            self._page(200, "encode.html", view=None, k=k, max_mib=app.limits.max_image_bytes / MIB)
        elif path in ("/user", "/item"):
            self._redirect(f"{path}/{_int(args.get('id'), path[1:] + ' id')}?k={k}")
        elif len(parts) == 2 and parts[0] == "user":
            view = views.user_view(app.model(), app.catalogue, _int(parts[1], "user id"), k,
                                   app.limits)
            self._page(200, "user.html", view=view)
        elif len(parts) == 2 and parts[0] == "item":
            view = views.item_view(app.model(), app.catalogue, _int(parts[1], "item id"), k,
                                   app.limits)
            self._page(200, "item.html", view=view)
        elif len(parts) == 2 and parts[0] == "image":
            self._image(parts[1])
        else:
            self._error(404, f"there is no page at {path}")

    def _post(self, path: str, _args: dict[str, str]) -> None:
        if path == "/encode":
            self._encode()
        elif path == "/login":
            self._login()
        elif path == "/logout":
            if self.app.sessions is not None:
                self.app.sessions.close(self._cookie())
            self._redirect("/login", cookie="")
        else:
            self._error(405, f"{path} does not take a POST; the inspection page is read-only")

    def _image(self, raw_id: str) -> None:
        """A catalogue image, or the placeholder with 404."""
        found = self.app.catalogue.image(_int(raw_id, "item id"))
        if found is None:
            self._send(404, PLACEHOLDER_SVG, "image/svg+xml")
        else:
            self._send(200, found[0], found[1], cache=True)

    def _encode(self) -> None:
        """Encode an uploaded item with the live bundle's towers and show what it would meet."""
        app = self.app
        limit = app.limits.max_image_bytes + MIB
        try:
            length = body_length(self.headers.get("Content-Length"), limit)
        except ServeError:
            self._discard(limit)
            raise
        body = self.rfile.read(length)
        if len(body) < length:
            raise InvalidArgument(f"the upload ended after {len(body)} of {length} bytes")
        form = parse_multipart(self.headers.get("Content-Type", ""), body)
        image, text = form.files.get("image", b""), form.get("text")
        k = _int(form.get("k"), "k", DEFAULT_K)
        check_item(image, text, app.limits)
        model = app.model()
        model.require_encoder()
        with app.metrics.encode_duration.time():
            vec = model.encode(image, text)
        view = views.encode_view(model, app.catalogue, vec, text, len(image), k, app.limits)
        self._page(200, "encode.html", view=view, k=k, max_mib=app.limits.max_image_bytes / MIB)

    def _login(self) -> None:
        """Open a session for a valid key and go back to where the user was."""
        form = parse_urlencoded(self.rfile.read(body_length(self.headers.get("Content-Length"),
                                                            4096)))
        target = _safe_next(form.get("next", "/"))
        if self.app.sessions is None:
            self._redirect(target)
            return
        token = self.app.sessions.open(form.get("key").strip())
        if token is None:
            self._page(401, "login.html", public=True, next=target,
                       message="that key is not valid")
        else:
            self._redirect(target, cookie=token)

    # -- auth ----------------------------------------------------------------------------------
    def _authorized(self, path: str) -> bool:
        """True when the request may see `path`; otherwise a 401 (a login page for pages)."""
        app = self.app
        if app.sessions is None or path in ("/login", "/style.css"):
            return True
        header = self.headers.get("Authorization", "")
        if header[:7].lower() == "bearer " and app.allowed(header[7:].strip()):
            return True
        if app.sessions.valid(self._cookie()):
            return True
        if path.startswith("/image/"):
            self._send(401, b"missing or invalid credentials\n", "text/plain")
        else:
            self._page(401, "login.html", public=True, next=_safe_next(self.path), message="")
        return False

    def _cookie(self) -> str | None:
        """The session token the browser sent, if any."""
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
        except CookieError:
            return None
        return None if morsel is None else morsel.value

    # -- responses -----------------------------------------------------------------------------
    def _page(self, code: int, template: str, public: bool = False, **context) -> None:
        self._send(code, self.app.render(template, public, **context), "text/html; charset=utf-8")

    def _error(self, code: int, message: str) -> None:
        try:
            self._page(code, "error.html", status=code, message=message)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception:  # noqa: BLE001 - the error page itself failed: plain text
            log.exception("inspection page: rendering the %d page failed", code)
            self._send(code, f"{code}: {message}\n".encode(), "text/plain; charset=utf-8")

    def _redirect(self, target: str, cookie: str | None = None) -> None:
        extra = {"Location": quote(target, safe="/?=&")}
        if cookie is not None:
            extra["Set-Cookie"] = (f"{COOKIE}={cookie}; HttpOnly; SameSite=Strict; Path=/; "
                                   f"Max-Age={SESSION_SECONDS if cookie else 0}")
        self._send(303, b"", "text/plain", extra=extra)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
                   "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                   "Cache-Control": "private, max-age=300" if cache else "no-store"}
        for name, value in {**headers, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _discard(self, limit: int) -> None:
        """Read (and drop) an oversized body, up to 2 x limit and while it keeps coming, so the
        browser reads the answer instead of a reset connection."""
        try:
            left = min(int(self.headers.get("Content-Length") or 0), 2 * limit)
            self.connection.settimeout(2)
            while left > 0:
                chunk = self.rfile.read1(min(left, MIB))
                if not chunk:
                    return
                left -= len(chunk)
        except (ValueError, OSError):
            return


class InspectionServer:
    """The page's HTTP server on its own thread; `stop()` ends it."""

    def __init__(self, app: App, host: str, port: int):
        handler = type("BoundHandler", (Handler,), {"app": app})
        server_class = type("UiServer", (ThreadingHTTPServer,),
                            {"address_family": _family(host), "daemon_threads": True})
        self.app, self.httpd = app, server_class((host.strip("[]"), port), handler)
        self.host, self.port = host, self.httpd.server_port
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ui-http",
                                        daemon=True)
        self._thread.start()
        log.info("inspection page on http://%s:%d/ (%s)", host, self.port,
                 "API keys" if app.sessions else "anonymous")

    def stop(self) -> None:
        """Stop accepting and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()


def _family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def start_ui(holder: ModelHolder, catalogue: Catalogue, host: str, port: int, limits: Limits,
             metrics: Metrics, allowed: Callable[[str], bool] | None = None) -> InspectionServer:
    """Serve the inspection page on host:port (0: a free port); `allowed(key)` turns auth on."""
    return InspectionServer(App(holder, catalogue, limits, metrics, allowed), host, port)
