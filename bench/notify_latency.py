"""Replication delay between two `--reuse-port` server processes on one PostgreSQL store.

A throwaway PostgreSQL cluster (bench/pgcluster.py) and a synthetic bundle with tiny ONNX encoders
(bench/bundle_factory.py); two `python -m serve --store postgresql://... --poll-seconds P
--reuse-port` processes A and B. Each round waits a random 0..P seconds (so rounds do not line up
with B's polls), upserts a new item through A (the probe item, which tops user 0's list), and
times from A's OK to B answering Recommend(user 0) with that item on top (B is asked every 2 ms);
then deletes the item through A and waits until B drops it. Printed per mode, LISTEN/NOTIFY on
(the default) and off (`--no-store-listen`: the poll only): p50, p90 and max over the rounds.

    python -m bench.notify_latency                      # 20 rounds per mode, --poll-seconds 2
    python -m bench.notify_latency --rounds 50 --poll-seconds 5
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bundle_factory import BundleSpec, probe_item, write_test_bundle
from bench.pgcluster import PgCluster, free_port
from bench.procs import client, clients_per_process, start_server, stop, wait_serving

ITEM0 = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.notify_latency",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="upserts timed per mode")
    p.add_argument("--poll-seconds", type=float, default=2.0)
    p.add_argument("--modes", nargs="+", choices=["listen", "poll"], default=["listen", "poll"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _until(check, timeout: float) -> float:
    """Seconds until check() is true (asked every 2 ms); raises after timeout."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"not seen within {timeout} s")
        time.sleep(0.002)
    return time.perf_counter() - start


def measure(bundles: Path, url: str, mode: str, args: argparse.Namespace) -> list[float]:
    """Upsert-to-visible delays (seconds) from A to B over args.rounds rounds."""
    port = free_port()
    options = ["--store", url, "--poll-seconds", str(args.poll_seconds), "--reuse-port"]
    if mode == "poll":
        options.append("--no-store-listen")
    procs = [start_server(bundles, *options, port=port)[0] for _ in range(2)]
    rng = random.Random(args.seed)
    try:
        for proc in procs:
            wait_serving(client(port), proc)
        time.sleep(1.0)
        a, b = clients_per_process(port)
        top = lambda: b.recommend(0, 1).items[0].item_id  # noqa: E731 - a one-line probe
        delays = []
        for i in range(args.rounds):
            time.sleep(rng.uniform(0, args.poll_seconds))
            item = ITEM0 + i
            a.upsert(item, *probe_item())
            delays.append(_until(lambda: top() == item, 10 * args.poll_seconds + 10))
            a.delete(item)
            _until(lambda: top() != item, 10 * args.poll_seconds + 10)
        return delays
    finally:
        for proc in procs:
            stop(proc)


def main(argv: list[str] | None = None) -> int:
    """Run every mode and print the table."""
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    bundles = write_test_bundle(root / "bundles", BundleSpec()).parent
    cluster = PgCluster().init().start()
    try:
        rows = []
        for mode in args.modes:
            ms = np.array(measure(bundles, cluster.new_store_url(), mode, args)) * 1000
            rows.append((mode, len(ms), *np.percentile(ms, [50, 90]), ms.max()))
    finally:
        cluster.remove()
        shutil.rmtree(root, ignore_errors=True)
    print(f"two --reuse-port processes, one PostgreSQL, --poll-seconds {args.poll_seconds:g}: "
          f"UpsertItem acknowledged by A -> item on top of Recommend from B")
    print(f"{'mode':<8} {'rounds':>6} {'p50 ms':>9} {'p90 ms':>9} {'max ms':>9}")
    for mode, n, p50, p90, top in rows:
        print(f"{mode:<8} {n:>6} {p50:>9.1f} {p90:>9.1f} {top:>9.1f}")
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
