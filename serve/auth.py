"""API keys with read and write roles, checked by the serve.guard.Gate interceptor.

Keys come from a file (`--api-keys FILE`) and/or the `PTMREC_API_KEYS` environment variable
(read by `__main__`, never from the command line): one `ROLE:KEY` per line (or separated by
commas in the variable), ROLE `read` or `write` (a write key may also read), blank lines and
`#` comments ignored, keys of at least 16 characters. The file is re-read when its mtime, size or
inode changes (checked at most every `reload_seconds`), so keys rotate without a restart; a file
that no longer parses keeps the previous keys and logs the error.

Clients send `authorization: Bearer KEY` (or `x-api-key: KEY`) metadata. Only sha256 digests of
the keys are kept, compared with `hmac.compare_digest` against every key. Answers carry no
detail: UNAUTHENTICATED "missing or invalid credentials" for no or an unknown key,
PERMISSION_DENIED "permission denied" for a read key on a write method (UpsertItem, DeleteItem,
RecordInteractions, and EncodeItem unless `encode_role` is read). Health and reflection may be
public (health is by default, so probes need no key).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import threading
import time
from pathlib import Path
from typing import Literal

from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from serve.guard import Refusal

log = logging.getLogger(__name__)

READ, WRITE = "read", "write"
WRITE_METHODS = frozenset({"UpsertItem", "DeleteItem", "RecordInteractions"})
MIN_KEY_CHARS = 16
UNAUTHENTICATED = Refusal("UNAUTHENTICATED", "missing or invalid credentials")
DENIED = Refusal("PERMISSION_DENIED", "permission denied")


class AuthConfig(BaseModel):
    """Who may call what; no keys and no client CA: anonymous (loopback only, unless allowed)."""

    model_config = ConfigDict(extra="forbid")

    api_keys: Path | None = Field(None, description="file of ROLE:KEY lines, re-read on change")
    api_keys_text: SecretStr | None = Field(None, description="ROLE:KEY entries from the "
                                            "environment (PTMREC_API_KEYS)")
    encode_role: Literal["read", "write"] = WRITE
    public_health: bool = True
    public_reflection: bool = False
    reload_seconds: float = Field(1.0, gt=0)
    tls_client_ca: Path | None = Field(None, description="PEM CA: require client certificates "
                                       "signed by it (mutual TLS; needs --tls-cert/--tls-key)")
    insecure_allow_anonymous: bool = False

    def has_keys(self) -> bool:
        """Whether API keys are configured (auth on, even if the file is empty for now)."""
        return self.api_keys is not None or self.api_keys_text is not None


class KeyFileError(ValueError):
    """A key file or variable that does not parse."""


def parse_keys(text: str, source: str) -> list[tuple[bytes, str]]:
    """(sha256 digest, role) of every `ROLE:KEY` entry; KeyFileError names the bad line."""
    keys: dict[bytes, str] = {}
    for number, line in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, sep, key = (part.strip() for part in line.partition(":"))
        if not sep or role not in (READ, WRITE):
            raise KeyFileError(f"{source} entry {number}: expected 'read:KEY' or 'write:KEY'")
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise KeyFileError(f"{source} entry {number}: a key needs {MIN_KEY_CHARS}+ "
                            "characters and no spaces")
        digest = hashlib.sha256(key.encode()).digest()
        if keys.get(digest, role) != role:
            raise KeyFileError(f"{source} entry {number}: the same key with two roles")
        keys[digest] = role
    return list(keys.items())


class KeyRing:
    """The current keys, re-read from the file when it changes."""

    def __init__(self, path: Path | None, text: str | None, reload_seconds: float = 1.0):
        self.path, self.reload_seconds = path, reload_seconds
        self._fixed = parse_keys(text, "PTMREC_API_KEYS") if text else []
        self._stamp = self._stat()
        self._keys = self._fixed + self._read()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def role(self, key: str) -> str | None:
        """The role of a presented key, or None; constant time over the number of keys."""
        self._maybe_reload()
        digest, found = hashlib.sha256(key.encode()).digest(), None
        for known, role in self._keys:
            if hmac.compare_digest(known, digest):
                found = role
        return found

    def _stat(self) -> tuple | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return ()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> list[tuple[bytes, str]]:
        if self.path is None:
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise KeyFileError(f"cannot read the API key file {self.path}: {err}") from err
        return parse_keys(text, str(self.path))

    def _maybe_reload(self) -> None:
        """Re-read the file if it changed (one thread at a time, the others keep the old keys)."""
        now = time.monotonic()
        if self.path is None or now - self._checked < self.reload_seconds:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._keys = self._fixed + self._read()
                log.info("API key file %s re-read: %d keys", self.path, len(self._keys))
            except KeyFileError as err:
                log.error("%s; keeping the previous keys", err)
        finally:
            self._lock.release()


class Authenticator:
    """The Gate's check: a Refusal for a call without the role its method needs, else None."""

    def __init__(self, cfg: AuthConfig):
        self.keys = KeyRing(cfg.api_keys, cfg.api_keys_text.get_secret_value()
                            if cfg.api_keys_text else None, cfg.reload_seconds)
        self.write_methods = WRITE_METHODS | ({"EncodeItem"} if cfg.encode_role == WRITE else set())
        self.public = ({health.SERVICE_NAME} if cfg.public_health else set()) | (
            {reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"}
            if cfg.public_reflection else set())

    def __call__(self, path: str, metadata) -> Refusal | None:
        """Check one call's metadata against the role its method needs."""
        service, _, method = path.lstrip("/").rpartition("/")
        if service in self.public:
            return None
        role = self.allowed_role(presented_key(metadata))
        if role is None:
            return UNAUTHENTICATED
        if method in self.write_methods and role != WRITE:
            return DENIED
        return None

    def allowed_role(self, key: str | None) -> str | None:
        """The role of a key (None for no or an unknown key)."""
        return None if not key else self.keys.role(key)


def presented_key(metadata) -> str | None:
    """The key of `authorization: Bearer KEY` or `x-api-key: KEY` metadata."""
    for name, value in metadata or ():
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
        if name == "x-api-key":
            return value.strip()
    return None


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: AuthConfig, grpc_host: str, metrics_host: str | None,
                   ui_host: str | None = None) -> None:
    """Refuse to serve anonymously on a non-loopback address unless explicitly allowed."""
    if cfg.insecure_allow_anonymous:
        return
    if not (cfg.has_keys() or cfg.tls_client_ca) and not is_loopback(grpc_host):
        raise RuntimeError(f"refusing to serve gRPC on {grpc_host} without authentication: pass "
                           "--api-keys FILE (or PTMREC_API_KEYS), or --tls-client-ca with "
                           "--tls-cert/--tls-key, or --insecure-allow-anonymous")
    if metrics_host is not None and not cfg.has_keys() and not is_loopback(metrics_host):
        raise RuntimeError(f"refusing to serve metrics on {metrics_host} without a read key: "
                           "pass --api-keys FILE (or PTMREC_API_KEYS), bind --metrics-host "
                           "127.0.0.1, or pass --insecure-allow-anonymous")
    if ui_host is not None and not cfg.has_keys() and not is_loopback(ui_host):
        raise RuntimeError(f"refusing to serve the inspection page on {ui_host} without a read "
                           "key: pass --api-keys FILE (or PTMREC_API_KEYS), bind --ui-host "
                           "127.0.0.1, or pass --insecure-allow-anonymous")
