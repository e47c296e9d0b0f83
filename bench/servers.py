"""Server processes for the load benchmarks: `python -m serve` on a loopback port (several sharing
it with --reuse-port), their CPU time and RSS from /proc, and the machine's load average.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench import procs
from bench.h2load import recommend_counts, scrape, served_version


def launch_server(root: Path, workers: int, port: int = 0, reuse_port: bool = False,
                  metrics: bool = False) -> tuple[subprocess.Popen, str, int | None]:
    """Run `python -m serve` on loopback; returns (process, target, metrics port) once it listens."""
    options = ["--poll-seconds", "0.5", "--workers", str(workers)]
    proc, grpc_port, metrics_port = procs.start_server(
        root, *options, *(["--reuse-port"] if reuse_port else []), port=port)
    return proc, f"127.0.0.1:{grpc_port}", metrics_port if metrics else None


def start_server(root: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """One server on a free loopback port, SERVING; returns (process, target)."""
    from serve.client import RecommenderClient

    proc, target, _ = launch_server(root, workers)
    with RecommenderClient(target, timeout=2) as client:
        deadline = time.monotonic() + 300
        while client.health() != "SERVING":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server never became SERVING")
            time.sleep(0.2)
    return proc, target


def loadavg() -> str:
    """The 1/5/15-minute load averages (the machine is shared: contention shows here)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerGroup:
    """`n` server processes sharing one loopback port (--reuse-port when n > 1), metrics on."""

    def __init__(self, root: Path, n: int, workers: int):
        self.procs: list[subprocess.Popen] = []
        self.metrics_ports: list[int] = []
        port = 0
        try:
            for _ in range(n):
                proc, self.target, mport = launch_server(root, workers, port, n > 1, metrics=True)
                self.procs.append(proc)
                self.metrics_ports.append(mport)
                port = int(self.target.rsplit(":", 1)[1])
            self.wait_loaded()
        except BaseException:
            self.stop()
            raise

    def wait_loaded(self, timeout: float = 300) -> None:
        """Block until every process serves a bundle."""
        deadline = time.monotonic() + timeout
        while not all(served_version(scrape(p)) >= 1 for p in self.metrics_ports):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a server process never loaded the bundle")
            time.sleep(0.2)

    def counts(self) -> list[dict[str, float]]:
        """Recommend counts by status code, per process."""
        return [recommend_counts(scrape(p)) for p in self.metrics_ports]

    def cpu(self) -> float:
        """CPU seconds used by all processes so far."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        """Terminate every process and wait for it."""
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(60)
