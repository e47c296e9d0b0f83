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

    python bench/serve_load.py --sizes 100000 1000000 --swaps 20 --soak-seconds 600
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"p99_ms_1client_1M": 5.0, "throughput_rps": 2000, "swap_errors": 0, "rss_growth": 0.05}


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
    p.add_argument("--workdir", type=Path, help="where bundles go (default: a temp dir)")
    return p.parse_args(argv)


def clustered(n: int, dim: int, seed: int, centres: int = 2000, noise: float = 0.35) -> np.ndarray:
    """Unit vectors around fixed Gaussian centres (SERVING.md §2.4's regime)."""
    c = np.random.default_rng(12345).standard_normal((centres, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 200_000):
        m = min(200_000, n - start)
        block = c[rng.integers(0, centres, m)] + noise * rng.standard_normal((m, dim), np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def make_bundle(root: Path, n_items: int, args: argparse.Namespace):
    """Write and publish the synthetic bundle; returns (path, BundleSpec)."""
    from tests.serve.bundle_factory import BundleSpec, write_test_bundle

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


def republish(root: Path, source: Path) -> int:
    """Publish a new version whose files are hard links to `source`'s; returns its number."""
    from index import bundle
    from index.manifest import Manifest

    manifest = Manifest.model_validate_json((source / bundle.MANIFEST).read_text())

    def link(tmp: Path) -> None:
        for name in manifest.files:
            os.link(source / name, tmp / name)

    path = bundle.write_bundle(root, link, manifest.model_copy(update={"files": {}}))
    bundle.publish(root, path.name, verify=False)
    return int(path.name[1:])


def start_server(root: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """Run `python -m serve` on a free loopback port; returns (process, target)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--bundles", str(root), "--port", "0", "--metrics-port",
         "-1", "--poll-seconds", "0.5", "--workers", str(workers), "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    if not line.startswith("serving on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    target = line.split()[2].rstrip(",")
    from serve.client import RecommenderClient

    with RecommenderClient(target, timeout=2) as client:
        deadline = time.monotonic() + 300
        while client.health() != "SERVING":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server never became SERVING")
            time.sleep(0.2)
    return proc, target


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
    from tests.serve.bundle_factory import WORDS, png

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
    from tests.serve.bundle_factory import probe_item

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


def bench_size(root: Path, n_items: int, args: argparse.Namespace) -> dict:
    """Every measurement for one catalogue size."""
    source, spec = make_bundle(root, n_items, args)
    proc, target = start_server(root, args.workers)
    out: dict = {"n_items": n_items, "rss_loaded_mib": rss_kib(proc.pid) / 1024}
    try:
        out["levels"] = []
        for c in args.concurrency:
            cpu = cpu_seconds(proc.pid)
            level = Load(target, c, args, spec, args.seconds, args.max_requests).finish()
            level["cpu_ms"] = 1000 * (cpu_seconds(proc.pid) - cpu) / max(level["ok"], 1)
            out["levels"].append(level)
        out["encode"] = bench_encode(target, args.encode_requests)
        if args.swaps:
            out["swaps"] = hot_swaps(root, source, target, args.swaps, args, spec)
        if args.soak_seconds:
            out["soak"] = soak(proc, target, args.soak_seconds, args, spec)
    finally:
        proc.terminate()
        out["exit_code"] = proc.wait(60)
    return out


def report(results: list[dict]) -> None:
    """Markdown tables of everything measured."""
    print("\n| items | clients | ok | errors | RPC/s | p50 ms | p99 ms | server CPU ms/RPC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for lv in r["levels"]:
            print(f"| {r['n_items']:,} | {lv['concurrency']} | {lv['ok']:,} | "
                  f"{sum(lv['errors'].values())} | {lv['rps']:.0f} | {lv['p50']:.2f} | "
                  f"{lv['p99']:.2f} | {lv['cpu_ms']:.2f} |")
    print("\n| items | EncodeItem n | p50 ms | p99 ms | server RSS loaded MiB | exit code |")
    print("|---|---|---|---|---|---|")
    for r in results:
        e = r["encode"]
        print(f"| {r['n_items']:,} | {e['n']} | {e['p50']:.2f} | {e['p99']:.2f} | "
              f"{r['rss_loaded_mib']:.0f} | {r['exit_code']} |")
    for r in (r for r in results if "swaps" in r):
        s = r["swaps"]
        print(f"\nhot swaps at {r['n_items']:,} items: {s['swaps']} swaps under 8 clients, "
              f"{s['ok']:,} ok, errors {s['errors'] or 0}, {s['rps']:.0f} RPC/s, p99 "
              f"{s['p99']:.2f} ms, versions seen {s['versions'][0]}..{s['versions'][-1]}, "
              f"publish-to-served p50 {s['swap_p50']:.2f} s, max {s['swap_max']:.2f} s")
    for r in (r for r in results if "soak" in r):
        s = r["soak"]
        print(f"\nsoak at {r['n_items']:,} items: {s['wall']:.0f} s, {s['ok']:,} ok, errors "
              f"{s['errors'] or 0}, RSS {s['rss_start_mib']:.0f} -> {s['rss_end_mib']:.0f} MiB "
              f"(max {s['rss_max_mib']:.0f}), growth {100 * s['growth']:+.2f}% "
              f"(target <= {100 * TARGETS['rss_growth']:.0f}%)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for every size and print the tables."""
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve-load-"))
    results = []
    try:
        for n in args.sizes:
            root = workdir / f"bundles-{n}"
            results.append(bench_size(root, n, args))
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmachine: {os.cpu_count()} cores shared by server and clients; "
          f"targets: p99 <= {TARGETS['p99_ms_1client_1M']} ms (1 client, 1M), "
          f">= {TARGETS['throughput_rps']} RPC/s, 0 errors during swaps")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
