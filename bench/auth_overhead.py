"""What API-key authentication costs on Recommend: two servers on one bundle, one anonymous and
one with --api-keys, driven alternately in rounds by the same client threads (the machine is
shared, so the rounds interleave and the figures compare within one run).

    python -m bench.auth_overhead [--rounds 6 --seconds 5 --threads 4 --items 20000]

Prints p50/p99 latency and calls/s for each server per round, then the medians and the ratio
auth/anonymous. Every call must be OK (a non-OK answer aborts the benchmark).
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import procs
from bench.bundle_factory import BundleSpec, write_test_bundle
from bench.servers import loadavg
from serve.client import RecommenderClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=5.0, help="per round and server")
    p.add_argument("--threads", type=int, default=4, help="concurrent client threads")
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=8, help="server --workers")
    return p.parse_args(argv)


def drive(client: RecommenderClient, users: list[int], seconds: float, threads: int) -> dict:
    """`threads` loops of Recommend(k=10) for `seconds`; latency percentiles (ms) and calls/s."""
    lat: list[list[float]] = [[] for _ in range(threads)]
    end = time.perf_counter() + seconds

    def loop(i: int) -> None:
        rng = np.random.default_rng(i)
        while time.perf_counter() < end:
            t = time.perf_counter()
            client.recommend(int(rng.choice(users)), 10)  # raises on any non-OK code
            lat[i].append(time.perf_counter() - t)

    start = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    ms = np.concatenate([np.asarray(x) for x in lat]) * 1000
    return dict(p50=float(np.percentile(ms, 50)), p99=float(np.percentile(ms, 99)),
                rps=len(ms) / wall)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the comparison."""
    args = parse_args(argv)
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = BundleSpec(n_users=1000, n_items=args.items, dim=64)
        write_test_bundle(root / "bundles", spec)
        (root / "keys.txt").write_text(f"read:{key}\n")
        users = [u * spec.user_id_step for u in range(spec.n_users)]
        options = ("--workers", str(args.workers))
        servers = {"anonymous": procs.start_server(root / "bundles", *options),
                   "api key": procs.start_server(root / "bundles", *options, "--api-keys",
                                                 str(root / "keys.txt"))}
        clients = {"anonymous": RecommenderClient(f"127.0.0.1:{servers['anonymous'][1]}", 10),
                   "api key": RecommenderClient(f"127.0.0.1:{servers['api key'][1]}", 10,
                                                api_key=key)}
        try:
            for name, (proc, _, _) in servers.items():
                procs.wait_serving(clients[name], proc)
                drive(clients[name], users, 1.0, args.threads)  # warm-up
            rows: dict[str, list[dict]] = {name: [] for name in servers}
            print(f"load average before: {loadavg()}")
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    row = drive(clients[name], users, args.seconds, args.threads)
                    rows[name].append(row)
                    print(f"round {r + 1} {name:>9}: p50 {row['p50']:.2f} ms  p99 "
                          f"{row['p99']:.2f} ms  {row['rps']:.0f} calls/s", flush=True)
            print(f"load average after: {loadavg()}")
            med = {name: {q: statistics.median(row[q] for row in rows[name])
                          for q in ("p50", "p99", "rps")} for name in servers}
            for name, m in med.items():
                print(f"median {name:>9}: p50 {m['p50']:.2f} ms  p99 {m['p99']:.2f} ms  "
                      f"{m['rps']:.0f} calls/s")
            a, b = med["api key"], med["anonymous"]
            print(f"api key / anonymous: p50 x{a['p50'] / b['p50']:.3f}  p99 "
                  f"x{a['p99'] / b['p99']:.3f}  calls/s x{a['rps'] / b['rps']:.3f}")
        finally:
            for c in clients.values():
                c.close()
            for proc, _, _ in servers.values():
                procs.stop(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
