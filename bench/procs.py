"""`python -m serve` as child processes for end-to-end tests and benchmarks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc

from serve.client import RecommenderClient

ROOT = Path(__file__).resolve().parents[1]


def start_server(bundles: Path, *options: str, port: int = 0) -> tuple[subprocess.Popen, int, int]:
    """Start a server (metrics on a free port); returns (process, gRPC port, metrics port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--bundles", str(bundles), "--port", str(port),
         "--metrics-port", "0", "--log-level", "WARNING", *options],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    if not line.startswith("serving on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    found = re.search(r"serving on \S+:(\d+), metrics on \S+:(\d+)", line)
    return proc, int(found.group(1)), int(found.group(2))


def client(port: int, own_connection: bool = False) -> RecommenderClient:
    """A client of 127.0.0.1:port; own_connection: its own TCP connection (with --reuse-port a
    new connection may reach another process)."""
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    return RecommenderClient(f"127.0.0.1:{port}", timeout=10, options=options)


def clients_per_process(port: int, n: int = 2, tries: int = 64) -> list[RecommenderClient]:
    """Clients whose connections landed on n different --reuse-port processes (told apart by
    GetModelInfo.loaded_at)."""
    found = {}
    for _ in range(tries):
        c = client(port, own_connection=True)
        key = c.info().loaded_at
        if key in found:
            c.close()
        else:
            found[key] = c
        if len(found) == n:
            return list(found.values())
    raise AssertionError(f"connections reached only {len(found)} of {n} processes")


def wait_serving(c: RecommenderClient, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll health until SERVING; fail if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if c.health() == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server never became SERVING")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM and wait (SIGKILL after 15 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()
