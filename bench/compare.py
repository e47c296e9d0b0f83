"""Side-by-side serving comparisons on a shared machine: servers from this tree or from another
source tree (e.g. `git archive main` with generated stubs, the code before a change), a
sequential Recommend probe, and a server RSS sampler. Used by bench.encode_isolation,
bench.mutation_load and bench.throughput, which alternate the settings they compare in one run
and print the load average with every figure.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.servers import loadavg, rss_kib

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """`python -m serve` from a source tree (default: this one) on a free loopback port."""

    def __init__(self, bundles: Path, *options: str, src: Path | None = None, port: int = 0):
        self.src = Path(src or ROOT)
        env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                            "PYTHONPATH": str(self.src)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "--bundles", str(bundles), "--port", str(port),
             "--metrics-port", "-1", "--log-level", "ERROR", "--poll-seconds", "0.5", *options],
            cwd=self.src, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        found = re.search(r"serving on \S+:(\d+)", line)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"server from {self.src} did not start: {line!r}")
        self.port = int(found.group(1))
        self.target = f"127.0.0.1:{self.port}"
        self.wait_serving()

    def wait_serving(self, timeout: float = 300) -> None:
        """Block until health says SERVING."""
        from serve.client import RecommenderClient

        deadline = time.monotonic() + timeout
        with RecommenderClient(self.target, timeout=2) as client:
            while True:
                try:
                    if client.health() == "SERVING":
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server never became SERVING")
                time.sleep(0.2)

    def rss_mib(self) -> float:
        """Current VmRSS."""
        return rss_kib(self.proc.pid) / 1024

    def stop(self) -> None:
        """SIGTERM, then wait."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class RssSampler:
    """Samples a server's VmRSS every `every` seconds in a thread; `.peak` in MiB."""

    def __init__(self, server: Server, every: float = 0.1):
        self.server, self.every, self.peak = server, every, server.rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.peak = max(self.peak, self.server.rss_mib())
            except OSError:
                return

    def stop(self) -> float:
        """Stop sampling; returns the peak."""
        self._stop.set()
        self._thread.join(5)
        return self.peak


def recommend_probe(target: str, seconds: float, users: int, step: int = 10, k: int = 20,
                    seed: int = 0) -> dict:
    """One sequential client calling Recommend for random users: p50 / p99 / max ms, errors."""
    import grpc

    from serve._gen.ptmrec.v1 import recommender_pb2 as pb
    from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    lat, errors = [], {}
    load = loadavg()
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        for _ in range(50):  # warm-up
            stub.Recommend(pb.RecommendRequest(user_id=0, k=k), timeout=30)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            req = pb.RecommendRequest(user_id=int(rng.integers(users)) * step, k=k)
            t = time.perf_counter()
            try:
                stub.Recommend(req, timeout=30)
                lat.append(time.perf_counter() - t)
            except grpc.RpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
    return summary(lat) | {"errors": errors, "load": load}


def summary(seconds: list[float]) -> dict:
    """n, p50, p99 and max in ms of a list of durations in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    if not len(ms):
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(ms), "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def fmt(s: dict) -> str:
    """'p50 / p99 / max ms (n)' of a summary."""
    return f"{s['p50']:.2f} / {s['p99']:.2f} / {s['max']:.1f} ({s['n']:,})"
