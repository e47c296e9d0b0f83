"""Load-test the gRPC server on loopback: Recommend latency/throughput, EncodeItem, hot swaps, soak.

For each catalogue size a synthetic bundle is written (clustered unit vectors, d=64, HNSW32 with
efSearch 128 by default, tiny ONNX encoders), the server runs in a subprocess (`python -m serve`),
and client processes (grpc.aio, `--client-procs` of them, concurrency split between them) send
Recommend for random known users at each concurrency level, each level bounded by
`--seconds` and `--max-requests`. Then EncodeItem latency, `--swaps` hot swaps while 8 clients
keep calling (each swap publishes a new version hard-linked from the first one and waits until
the server answers with it), and an optional `--soak-seconds` run that samples the server's
VmRSS. Client and server share the machine's cores, so throughput is a lower bound; the server's CPU
time per RPC (from /proc/<pid>/stat) gives its capacity per core independently of the clients.

`--driver h2load` (or `both`, the default) also measures throughput with h2load, nghttp2's C HTTP/2
load generator (Debian: `apt-get install nghttp2-client`), so that the load generator costs far less
CPU than the server: one gRPC-framed RecommendRequest body file per user (h2load sends one body per
process, so each h2load process of a setting gets a different user), every `--h2load-settings`
(connections x streams) against every `--server-configs` (processes x RPC threads; several processes
share the port with `--reuse-port`). h2load counts any HTTP 200 as a success, gRPC errors included, so
each body is first sent once with `nghttp` and its `grpc-status` trailer checked, and the servers'
own `recsys_requests_total{method="Recommend"}` counters (scraped from their metrics ports before
and after) must show no status but OK. Without h2load that part is skipped with a message.
With several processes the kernel spreads connections by a hash of their addresses, so with few
connections all of them may land on one process: the per-process OK column shows the split.

    python -m bench.serve_load --sizes 100000 1000000 --swaps 20 --soak-seconds 600
    python -m bench.serve_load --driver h2load --swaps 0 --server-configs 1x8 2x4
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bundle_factory import BundleSpec, clustered, republish, write_test_bundle
from bench.h2load import H2LOAD_MISSING, run_h2load, sample_status, write_bodies
from bench.servers import ServerGroup, cpu_seconds, loadavg, rss_kib, start_server

TARGETS = {"p99_ms_1client_1M": 5.0, "throughput_rps": 2000, "swap_errors": 0, "rss_growth": 0.05}


def pair(text: str) -> tuple[int, int]:
    """'4x8' -> (4, 8)."""
    a, b = text.lower().split("x")
    return int(a), int(b)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--factory", default="HNSW32")
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--nprobe", type=int, default=8, help="for IVF factories")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    p.add_argument("--max-requests", type=int, default=50_000, help="per concurrency level")
    p.add_argument("--encode-requests", type=int, default=300)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--soak-seconds", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=8, help="server RPC threads")
    p.add_argument("--driver", choices=["python", "h2load", "both"], default="both",
                   help="Recommend throughput from Python clients, h2load, or both")
    p.add_argument("--h2load-settings", type=pair, nargs="+", default=[(1, 1), (4, 8), (8, 16)],
                   metavar="CONNSxSTREAMS", help="h2load connections x concurrent streams each")
    p.add_argument("--server-configs", type=pair, nargs="+", default=[(1, 8), (1, 4), (2, 4), (2, 8)],
                   metavar="PROCSxTHREADS", help="server processes (--reuse-port) x RPC threads")
    p.add_argument("--h2load-users", type=int, default=4,
                   help="distinct users per h2load setting (one h2load process each)")
    p.add_argument("--h2load-seconds", type=float, default=8.0)
    p.add_argument("--h2load-warmup", type=float, default=1.0)
    p.add_argument("--workdir", type=Path, help="where bundles go (default: a temp dir)")
    return p.parse_args(argv)


def make_bundle(root: Path, n_items: int, args: argparse.Namespace):
    """Write and publish the synthetic bundle; returns (path, BundleSpec)."""
    params = {"ef_search": args.ef_search} if "HNSW" in args.factory else (
        {"nprobe": args.nprobe} if "IVF" in args.factory else {})
    spec = BundleSpec(n_users=args.users, n_items=n_items, dim=args.dim, factory=args.factory,
                      items=clustered(n_items, args.dim, 1), users=clustered(args.users, args.dim, 2),
                      search_params=params, seen_per_user=20)
    start = time.perf_counter()
    path = write_test_bundle(root, spec)
    print(f"bundle {n_items:,} items ({args.factory} {params}) written in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return path, spec


def _load_worker(target: str, tasks: int, users: int, step: int, k: int, seconds: float,
                 max_requests: int, start_at: float, seed: int, queue, stop) -> None:
    """One client process: `tasks` concurrent grpc.aio Recommend loops."""
    import asyncio
    import random

    import grpc

    from serve._gen.ptmrec.v1 import recommender_pb2 as pb
    from serve._gen.ptmrec.v1 import recommender_pb2_grpc as pb_grpc

    lat, errors, versions = [], {}, set()

    async def loop(stub, rng: random.Random, end: float) -> None:
        while (time.time() < end and len(lat) + sum(errors.values()) < max_requests
               and not stop.is_set()):
            req = pb.RecommendRequest(user_id=rng.randrange(users) * step, k=k)
            t = time.perf_counter()
            try:
                resp = await stub.Recommend(req, timeout=10)
                lat.append(time.perf_counter() - t)
                versions.add(resp.model_version)
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1

    async def main() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            await channel.channel_ready()
            await asyncio.sleep(max(0.0, start_at - time.time()))
            span[0] = time.time()
            await asyncio.gather(*(loop(stub, random.Random(seed * 1000 + i), span[0] + seconds)
                                   for i in range(tasks)))
            span[1] = time.time()

    span = [0.0, 0.0]
    asyncio.run(main())
    queue.put((lat, errors, sorted(versions), span))


class Load:
    """Client processes driving Recommend at one concurrency level (start, then finish)."""

    def __init__(self, target: str, concurrency: int, args: argparse.Namespace, spec,
                 seconds: float, max_requests: int):
        ctx = mp.get_context("spawn")
        self.queue, self.stop, self.concurrency = ctx.Queue(), ctx.Event(), concurrency
        n = min(args.client_procs, concurrency)
        split = [concurrency // n + (i < concurrency % n) for i in range(n)]
        start_at = time.time() + 3.0  # leave time for spawn and imports
        self.seconds = seconds
        self.procs = [ctx.Process(target=_load_worker, args=(
            target, tasks, spec.n_users, spec.user_id_step, args.k, seconds, max_requests // n,
            start_at, i, self.queue, self.stop)) for i, tasks in enumerate(split)]
        for p in self.procs:
            p.start()

    def finish(self, stop: bool = False) -> dict:
        """Wait for (or stop) the clients and merge their results."""
        if stop:
            self.stop.set()
        results = [self.queue.get(timeout=self.seconds + 300) for _ in self.procs]
        for p in self.procs:
            p.join(30)
        lat = np.concatenate([np.asarray(r[0], dtype=np.float64) for r in results]) * 1000
        errors: dict[str, int] = {}
        for r in results:
            for code, n in r[1].items():
                errors[code] = errors.get(code, 0) + n
        wall = max(r[3][1] for r in results) - min(r[3][0] for r in results)
        pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
        return dict(concurrency=self.concurrency, ok=len(lat), errors=errors,
                    rps=len(lat) / max(wall, 1e-9), p50=pct(50), p99=pct(99), wall=wall,
                    versions=sorted({v for r in results for v in r[2]}))


def bench_encode(target: str, n: int) -> dict:
    """EncodeItem latency with random 64x64 PNGs and short texts (sync client)."""
    from serve.client import RecommenderClient
    from bench.bundle_factory import WORDS, png

    rng = np.random.default_rng(0)
    payloads = [(png(tuple(int(c) for c in rng.integers(0, 255, 3)), (64, 64), seed=i),
                 " ".join(rng.choice(WORDS, 6))) for i in range(min(n, 50))]
    lat = []
    with RecommenderClient(target, timeout=10) as client:
        for i in range(n):
            image, text = payloads[i % len(payloads)]
            t = time.perf_counter()
            client.encode(image, text)
            lat.append((time.perf_counter() - t) * 1000)
    return dict(n=n, p50=float(np.percentile(lat, 50)), p99=float(np.percentile(lat, 99)))


def hot_swaps(root: Path, source: Path, target: str, n: int, args, spec) -> dict:
    """n swaps while 8 clients call Recommend; each waits until the server answers with it."""
    from serve.client import RecommenderClient

    load = Load(target, 8, args, spec, seconds=60 + 60 * n, max_requests=10**7)
    time.sleep(4)
    swap_s = []
    with RecommenderClient(target, timeout=10) as client:
        for _ in range(n):
            start = time.perf_counter()
            version = republish(root, source)
            while client.info().model_version != version:
                if time.perf_counter() - start > 300:
                    raise RuntimeError(f"v{version} was never served")
                time.sleep(0.05)
            swap_s.append(time.perf_counter() - start)
    time.sleep(1)
    stats = load.finish(stop=True)
    return stats | dict(swaps=n, swap_p50=float(np.median(swap_s)), swap_max=max(swap_s))


def soak(proc: subprocess.Popen, target: str, seconds: float, args, spec) -> dict:
    """Recommend load (8 clients) plus ~10 EncodeItem/s; VmRSS sampled every 2 s."""
    from serve.client import RecommenderClient
    from bench.bundle_factory import probe_item

    load = Load(target, 8, args, spec, seconds=seconds, max_requests=10**8)
    time.sleep(3)
    samples, end = [], time.monotonic() + seconds
    with RecommenderClient(target, timeout=10) as client:
        while time.monotonic() < end:
            client.encode(*probe_item())
            if not samples or time.monotonic() - samples[-1][0] >= 2:
                samples.append((time.monotonic(), rss_kib(proc.pid)))
            time.sleep(0.1)
    stats = load.finish(stop=True)
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    base = rss[min(len(rss) - 1, max(1, len(rss) // 10))]  # after a warm-up tenth
    return stats | dict(rss_start_mib=base / 1024, rss_end_mib=rss[-1] / 1024,
                        rss_max_mib=rss.max() / 1024, growth=(rss[-1] - base) / base)


def h2load_level(group: ServerGroup, bodies: list[Path], conns: int, streams: int,
                 args: argparse.Namespace) -> dict:
    """One h2load setting, cross-checked with the servers' own status-code counters."""
    load = loadavg()
    counts0, cpu0 = group.counts(), group.cpu()
    res = run_h2load(group.target, bodies, conns, streams, args)
    counts1, cpu1 = group.counts(), group.cpu()
    ok = [int(c1.get("OK", 0) - c0.get("OK", 0)) for c0, c1 in zip(counts0, counts1)]
    errors: dict[str, int] = {}
    for c0, c1 in zip(counts0, counts1):
        for code, n in c1.items():
            if code != "OK" and n > c0.get(code, 0):
                errors[code] = errors.get(code, 0) + int(n - c0.get(code, 0))
    served = max(sum(ok), 1)
    return res | dict(conns=conns, streams=streams, server_ok=ok, server_errors=errors,
                      server_cpu_ms=1000 * (cpu1 - cpu0) / served,
                      client_cpu_ms=1000 * res["client_cpu"] / served, load=load)


def h2load_size(root: Path, args: argparse.Namespace, spec) -> list[dict]:
    """Every --server-configs x --h2load-settings pair for one catalogue size."""
    bodies = write_bodies(root.parent / f"h2load-{root.name}", spec, args.k, args.h2load_users)
    rows = []
    for procs, threads in args.server_configs:
        group = ServerGroup(root, procs, threads)
        try:
            status = ",".join(sorted({sample_status(group.target, b) for b in bodies}))
            for conns, streams in args.h2load_settings:
                rows.append(h2load_level(group, bodies, conns, streams, args)
                            | dict(procs=procs, threads=threads, sample_status=status))
                print(f"h2load {spec.n_items:,} items, {procs}x{threads} server, "
                      f"{conns}x{streams}: {rows[-1]['rps']:.0f} req/s", flush=True)
        finally:
            group.stop()
    shutil.rmtree(bodies[0].parent, ignore_errors=True)
    return rows


def python_part(root: Path, source: Path, spec, n_items: int, args: argparse.Namespace) -> dict:
    """One default server: Python-client levels (unless --driver h2load), encode, swaps, soak."""
    proc, target = start_server(root, args.workers)
    out: dict = {"n_items": n_items, "rss_loaded_mib": rss_kib(proc.pid) / 1024, "levels": []}
    try:
        for c in args.concurrency if args.driver != "h2load" else []:
            cpu, load = cpu_seconds(proc.pid), loadavg()
            level = Load(target, c, args, spec, args.seconds, args.max_requests).finish()
            level["cpu_ms"] = 1000 * (cpu_seconds(proc.pid) - cpu) / max(level["ok"], 1)
            out["levels"].append(level | {"load": load})
        out["encode"] = bench_encode(target, args.encode_requests) | {"load": loadavg()}
        if args.swaps:
            load = loadavg()
            out["swaps"] = hot_swaps(root, source, target, args.swaps, args, spec) | {"load": load}
        if args.soak_seconds:
            load = loadavg()
            out["soak"] = soak(proc, target, args.soak_seconds, args, spec) | {"load": load}
    finally:
        proc.terminate()
        out["exit_code"] = proc.wait(60)
    return out


def bench_size(root: Path, n_items: int, args: argparse.Namespace, h2load: bool) -> dict:
    """Every measurement for one catalogue size."""
    source, spec = make_bundle(root, n_items, args)
    out = python_part(root, source, spec, n_items, args)
    if h2load:
        out["h2load"] = h2load_size(root, args, spec)
    return out


def report_levels(results: list[dict]) -> None:
    """Python-client Recommend levels."""
    print("\n| items | Python clients | ok | errors | RPC/s | p50 ms | p99 ms | server CPU ms/RPC "
          "| loadavg before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for lv in r["levels"]:
            print(f"| {r['n_items']:,} | {lv['concurrency']} | {lv['ok']:,} | "
                  f"{sum(lv['errors'].values())} | {lv['rps']:.0f} | {lv['p50']:.2f} | "
                  f"{lv['p99']:.2f} | {lv['cpu_ms']:.2f} | {lv['load']} |")


def report_h2load(results: list[dict]) -> None:
    """h2load Recommend settings against each server configuration."""
    print("\n| items | server procs x threads | h2load conns x streams | users | req/s | p50 ms "
          "| p99 ms | HTTP 2xx | server OK incl. warm-up (per proc) | errors | grpc-status sample "
          "| server CPU ms/RPC | h2load CPU ms/RPC | loadavg before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for h in r.get("h2load", []):
            errors = sum(h["server_errors"].values()) + h["failed"]
            print(f"| {r['n_items']:,} | {h['procs']}x{h['threads']} | {h['conns']}x{h['streams']} "
                  f"| {h['users']} | {h['rps']:.0f} | {h['p50']:.2f} | {h['p99']:.2f} | "
                  f"{h['http_2xx']:,} | {'/'.join(str(n) for n in h['server_ok'])} | {errors} "
                  f"{h['server_errors'] or ''} | {h['sample_status']} | {h['server_cpu_ms']:.2f} | "
                  f"{h['client_cpu_ms']:.2f} | {h['load']} |")
    best = [(h["rps"], r["n_items"], h) for r in results for h in r.get("h2load", [])
            if not h["server_errors"] and not h["failed"] and h["sample_status"] == "0"]
    for n in sorted({b[1] for b in best}):
        rps, _, h = max(b for b in best if b[1] == n)
        print(f"best error-free h2load at {n:,} items: {rps:.0f} req/s with {h['procs']} "
              f"process(es) x {h['threads']} threads, {h['conns']}x{h['streams']} "
              f"(target >= {TARGETS['throughput_rps']})")


def report_rest(results: list[dict]) -> None:
    """EncodeItem, hot swaps and soak."""
    print("\n| items | EncodeItem n | p50 ms | p99 ms | server RSS loaded MiB | exit code "
          "| loadavg before |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        e = r["encode"]
        print(f"| {r['n_items']:,} | {e['n']} | {e['p50']:.2f} | {e['p99']:.2f} | "
              f"{r['rss_loaded_mib']:.0f} | {r['exit_code']} | {e['load']} |")
    for r in (r for r in results if "swaps" in r):
        s = r["swaps"]
        print(f"\nhot swaps at {r['n_items']:,} items: {s['swaps']} swaps under 8 clients, "
              f"{s['ok']:,} ok, errors {s['errors'] or 0}, {s['rps']:.0f} RPC/s, p99 "
              f"{s['p99']:.2f} ms, versions seen {s['versions'][0]}..{s['versions'][-1]}, "
              f"publish-to-served p50 {s['swap_p50']:.2f} s, max {s['swap_max']:.2f} s "
              f"(loadavg before {s['load']})")
    for r in (r for r in results if "soak" in r):
        s = r["soak"]
        print(f"\nsoak at {r['n_items']:,} items: {s['wall']:.0f} s, {s['ok']:,} ok, errors "
              f"{s['errors'] or 0}, RSS {s['rss_start_mib']:.0f} -> {s['rss_end_mib']:.0f} MiB "
              f"(max {s['rss_max_mib']:.0f}), growth {100 * s['growth']:+.2f}% "
              f"(target <= {100 * TARGETS['rss_growth']:.0f}%; loadavg before {s['load']})")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for every size and print the tables."""
    args = parse_args(argv)
    h2load = args.driver != "python" and shutil.which("h2load") is not None
    if args.driver != "python" and not h2load:
        print(H2LOAD_MISSING, file=sys.stderr, flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve-load-"))
    results = []
    try:
        for n in args.sizes:
            root = workdir / f"bundles-{n}"
            results.append(bench_size(root, n, args, h2load))
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmachine: {os.cpu_count()} cores shared by server and load generator; "
          f"targets: p99 <= {TARGETS['p99_ms_1client_1M']} ms (1 client, 1M), "
          f">= {TARGETS['throughput_rps']} RPC/s, 0 errors during swaps")
    report_levels(results)
    if h2load:
        report_h2load(results)
    elif args.driver != "python":
        print(f"\n{H2LOAD_MISSING}")
    report_rest(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
