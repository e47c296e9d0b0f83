"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb + pg_ctl in a temporary folder.

The cluster listens on a free loopback port only (no Unix socket outside its folder), trusts local
connections, and is removed by `stop()`. As root the server binaries run as the `postgres` user
(initdb refuses root) through `runuser`. Debian's package puts them in
/usr/lib/postgresql/<major>/bin; `find_bin()` is None when PostgreSQL is not installed.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

SEARCH = ("/usr/lib/postgresql/*/bin",)


def find_bin() -> Path | None:
    """Folder holding initdb and pg_ctl, or None."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "pg_ctl").is_file()), None)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One initdb'd cluster; `url(db)` names a database in it."""

    def __init__(self, bin_dir: Path | None = None):
        self.bin = bin_dir or find_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="ptmrec-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user = os.geteuid() == 0
        if self.as_user:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> None:
        """Run a server binary (as postgres when we are root)."""
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)

    def init(self) -> PgCluster:
        """initdb the data folder (trust auth, superuser postgres; the server itself fsyncs)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        return self

    def start(self) -> PgCluster:
        """Start the server on 127.0.0.1:port and wait until it accepts connections."""
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.root} -c max_connections=50 "
                f"-c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts,
                  "-w", "-t", "60", "start", timeout=90)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode fast, or immediate for a crash)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server and delete the cluster."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        """Connection URL of a database in the cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_store_url(self) -> str:
        """An empty schema of the postgres database; returns a URL whose search_path is it
        (cheaper than a database per test: nothing to copy, nothing to fsync)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        for attempt in range(50):
            try:
                with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"CREATE SCHEMA {name}")
                return f"{self.url()}?options=-csearch_path%3D{name}"
            except psycopg.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")


def cluster_or_reason() -> tuple[PgCluster | None, str]:
    """A started cluster, or None and why not."""
    if find_bin() is None:
        return None, "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install 'psycopg[binary]')"
    cluster = PgCluster()
    try:
        cluster.init().start()
    except (subprocess.SubprocessError, OSError) as err:
        log = cluster.root / "log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        cluster.remove()
        return None, f"could not start PostgreSQL: {err} {detail}"
    return cluster, ""
