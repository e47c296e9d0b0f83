"""Recommend throughput against the grpcio ceiling, in one run: h2load req/s of the trivial
handler (bench.trivial_server, sync and grpc.aio), of this tree's server and, with
`--baseline-src DIR`, of another source tree, each with 1 and 2 processes (--reuse-port); plus one
sequential Python client's p50/p99 per server, and the FAISS figures that decide micro-batching
(one search of B queries against B searches of one, at one OpenMP thread).

Settings are interleaved (`--rounds`): every server is measured once per round, so machine noise
hits all of them alike; the table gives the median and range over rounds and the ratio of each
median to the sync ceiling's of the same process count.

    python -m bench.throughput --bundles DIR [--procs 1 2] [--settings 4x8 8x16] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.compare import ROOT, fmt, recommend_probe
from bench.h2load import run_h2load, sample_status, write_bodies
from bench.serve_load import pair
from bench.servers import loadavg


def _spawn(cmd: list[str], src: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                        "PYTHONPATH": str(src)}
    return subprocess.Popen(cmd, cwd=src, stdout=subprocess.PIPE, text=True, env=env)


def start_group(kind: str, n: int, bundles: Path, baseline: Path | None) -> tuple[list, str]:
    """n processes of one server kind sharing a loopback port; returns (procs, target)."""
    procs, port = [], 0
    for _ in range(n):
        reuse = ["--reuse-port"] if n > 1 else []
        if kind.startswith("trivial"):
            cmd = [sys.executable, "-m", "bench.trivial_server", "--port", str(port), *reuse,
                   *(["--aio"] if kind == "trivial-aio" else [])]
            src = ROOT
        else:
            cmd = [sys.executable, "-m", "serve", "--bundles", str(bundles), "--port", str(port),
                   "--metrics-port", "-1", "--log-level", "ERROR", *reuse]
            src = ROOT if kind == "this tree" else baseline
        proc = _spawn(cmd, src)
        found = re.search(r"serving on \S+:(\d+)", proc.stdout.readline())
        if not found:
            raise RuntimeError(f"{kind} did not start")
        port = int(found.group(1))
        procs.append(proc)
    target = f"127.0.0.1:{port}"
    if not kind.startswith("trivial"):
        _wait_all_serving(target, n)
    return procs, target


def _wait_all_serving(target: str, n: int, timeout: float = 300) -> None:
    """Until n fresh connections in a row get an OK Recommend (each may reach any process)."""
    deadline, ok = time.monotonic() + timeout, 0
    while ok < 4 * n:
        try:
            recommend_probe(target, 0.0, 1)
            ok += 1
        except Exception:  # noqa: BLE001 - a process still loading
            ok = 0
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    time.sleep(1.0 * n)  # the kernel may route a later connection to the last one loaded


def stop(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)
        p.stdout.close()


def faiss_batching(bundles: Path, batch_sizes=(1, 4, 8, 16), n: int = 512) -> list[str]:
    """us per query: one search of B queries vs B single searches (1 OpenMP thread)."""
    import faiss

    from index import ann
    from index.bundle import current_version

    faiss.omp_set_num_threads(1)
    version = bundles / current_version(bundles)
    index = ann.load(version / "items.faiss", use_gpu=False)
    q = np.ascontiguousarray(np.load(version / "users.npy")[:n], dtype=np.float32)
    out = []
    for b in batch_sizes:
        t = time.perf_counter()
        for i in range(0, n - b + 1, b):
            index.search(q[i:i + b], 40)
        out.append(f"B={b}: {1e6 * (time.perf_counter() - t) / (n - n % b):.0f} us/query")
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure every server kind x process count x h2load setting, interleaved over rounds."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--settings", type=pair, nargs="+", default=[(4, 8), (8, 16)])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=6.0, help="per h2load run")
    p.add_argument("--probe-seconds", type=float, default=8.0)
    p.add_argument("--baseline-src", type=Path)
    p.add_argument("--no-aio", action="store_true")
    args = p.parse_args(argv)
    kinds = ["trivial"] + ([] if args.no_aio else ["trivial-aio"]) + ["this tree"] + (
        ["baseline"] if args.baseline_src else [])
    h2 = SimpleNamespace(h2load_seconds=args.seconds, h2load_warmup=1.0)
    bodies = write_bodies(Path(tempfile.mkdtemp(prefix="tput-")), SimpleNamespace(
        n_users=args.users, user_id_step=10), 20, 4)
    rps: dict[tuple, list[float]] = {}
    lat: dict[tuple, list[float]] = {}
    probes: dict[str, dict] = {}
    loads = []
    for _ in range(args.rounds):
        for procs in args.procs:
            for kind in kinds:
                group, target = start_group(kind, procs, args.bundles, args.baseline_src)
                try:
                    status = sample_status(target, bodies[0])
                    if status != "0":
                        raise RuntimeError(f"{kind}: grpc-status {status}")
                    if procs == 1 and kind not in probes and not kind.startswith("trivial-"):
                        probes[kind] = recommend_probe(target, args.probe_seconds, args.users)
                    for conns, streams in args.settings:
                        loads.append(loadavg())
                        res = run_h2load(target, bodies, conns, streams, h2)
                        if res["failed"]:
                            raise RuntimeError(f"{kind}: {res['failed']} failed requests")
                        key = (kind, procs, conns, streams)
                        rps.setdefault(key, []).append(res["rps"])
                        lat.setdefault(key, []).append(res["p99"])
                        print(f"{kind} {procs}p {conns}x{streams}: {res['rps']:.0f} req/s",
                              flush=True)
                finally:
                    stop(group)
    print(f"\n{args.rounds} rounds, h2load {args.seconds:.0f} s per run; loadavg over the runs: "
          f"{loads[0]} .. {loads[-1]}\n")
    print("| server | procs | h2load conns x streams | req/s median (range) | vs sync ceiling | "
          "h2load p99 ms (median) |\n|---|---|---|---|---|---|")
    for (kind, procs, conns, streams), values in rps.items():
        ceiling = np.median(rps[("trivial", procs, conns, streams)])
        print(f"| {kind} | {procs} | {conns}x{streams} | {np.median(values):.0f} "
              f"({min(values):.0f}-{max(values):.0f}) | {np.median(values) / ceiling:.2f} | "
              f"{np.median(lat[(kind, procs, conns, streams)]):.2f} |")
    print("\n| server (1 process) | sequential Recommend p50 / p99 / max ms (n) | loadavg |\n"
          "|---|---|---|")
    for kind, s in probes.items():
        print(f"| {kind} | {fmt(s)} | {s['load']} |")
    print("\nFAISS at this bundle, k=40:", "; ".join(faiss_batching(args.bundles)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
