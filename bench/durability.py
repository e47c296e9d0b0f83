"""Durable online writes, measured: kill -9 mid-burst, write throughput, read latency, fold-in.

For SQLite (the default state folder) and PostgreSQL (a throwaway cluster, bench/pgcluster.py) a
synthetic bundle with tiny ONNX encoders (bench/bundle_factory.py) is served by
`python -m serve` on loopback and:
1. durability: `--threads` client threads send `--calls` UpsertItem and RecordInteractions calls
   (alternating, each with its own request id, retried on UNAVAILABLE until answered OK) while the
   server is SIGKILLed once `--kill-at` of them are acknowledged and restarted on the same store;
   then every call is checked on the restarted server (an upserted item is in the index when a
   fold-in over it uses it; a user's interactions when Recommend folds them in) and in the store
   (rows per item / request id): acknowledged, applied after restart, lost, applied twice;
2. write throughput: ops/s of UpsertItem and of RecordInteractions from `--threads` threads;
3. Recommend p50/p99 from 2 client threads without, then with, a concurrent writer.
Then, on the synthetic catalogue (train.synthetic, a LightGCN trained by export.retrain): for
`--fold-users` known users, 5 RecordInteractions with items of one category (random per user,
seeded), and that category's share of the user's top-10 before and after.
Also: SQLite commit time of an image payload inline (BLOB) vs a content-addressed file written
with index.atomic plus its row, the measurement behind storing images inline.

    python -m bench.durability                       # everything, about 3 minutes here
    python -m bench.durability --stores sqlite --skip-foldin --calls 400
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

from index.atomic import write_bytes
from index.events import open_store
from bench.pgcluster import PgCluster, free_port
from bench.bundle_factory import BundleSpec, png, write_test_bundle
from bench.procs import ROOT, client, start_server, stop, wait_serving

RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.CANCELLED}
ITEM0, USER0 = 100_000, 5_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.durability",
                                description=__doc__.split("\n")[0])
    p.add_argument("--stores", nargs="+", choices=["sqlite", "postgresql"],
                   default=["sqlite", "postgresql"])
    p.add_argument("--calls", type=int, default=2000, help="durability burst size (both RPCs)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--kill-at", type=float, default=0.4, help="acknowledged share at SIGKILL")
    p.add_argument("--throughput-calls", type=int, default=400, help="per RPC")
    p.add_argument("--latency-seconds", type=float, default=5.0, help="per phase")
    p.add_argument("--fold-users", type=int, default=100)
    p.add_argument("--skip-foldin", action="store_true")
    p.add_argument("--skip-payloads", action="store_true")
    return p.parse_args(argv)


class Calls:
    """A burst: call i upserts item ITEM0+offset+i (even i) or records interactions of user
    USER0+offset+i (odd i); each phase takes its own offset."""

    def __init__(self, n: int, tag: str, offset: int = 0):
        self.n, self.tag, self.offset = n, tag, offset
        self.errors: list[str] = []
        self.acked = np.zeros(n, dtype=bool)
        self.retried = np.zeros(n, dtype=np.int64)
        self.image = png((30, 120, 200), seed=3)
        self.lock = threading.Lock()

    def items(self, i: int) -> list[int]:
        """The two bundle items of interaction call i."""
        return [1000 + i % 200, 1000 + (i * 7 + 1) % 200]

    def send(self, c, i: int) -> None:
        """One call, retried while the server is away."""
        deadline = time.monotonic() + 120
        while True:
            try:
                key, rid = self.offset + i, f"{self.tag}-{i}"
                if i % 2 == 0:
                    c.upsert(ITEM0 + key, self.image, f"blue mug {i}", request_id=rid)
                else:
                    c.record(USER0 + key, self.items(i), kind="click", request_id=rid)
                self.acked[i] = True
                return
            except grpc.RpcError as err:
                if err.code() not in RETRY or time.monotonic() > deadline:
                    raise
                self.retried[i] += 1
                time.sleep(0.05)


def burst(calls: Calls, port: int, threads: int, indices: list[int]) -> threading.Thread:
    """Start `threads` client threads over `indices`; returns a thread that joins them."""
    def worker(share: list[int]) -> None:
        with client(port, own_connection=True) as c:
            c.timeout = 5
            for i in share:
                try:
                    calls.send(c, i)
                except grpc.RpcError as err:
                    calls.errors.append(f"call {i}: {err.code().name}: {err.details()}")

    workers = [threading.Thread(target=worker, args=(indices[k::threads],)) for k in range(threads)]
    for w in workers:
        w.start()
    joiner = threading.Thread(target=lambda: [w.join() for w in workers])
    joiner.start()
    return joiner


def verify(calls: Calls, port: int, url: str) -> dict:
    """Which calls the restarted server applies, and how often the store holds each."""
    applied = np.zeros(calls.n, dtype=bool)
    with client(port) as c:
        for i in range(calls.n):
            if i % 2 == 0:
                used = c.recommend(9_999_999, 1, recent=[ITEM0 + i]).recent_items_used
                applied[i] = used == 1
            else:
                applied[i] = c.recommend(USER0 + i, 1).recent_items_used == 2
        online = c.info().online_interactions
    store = open_store(url)
    with store._cursor() as cur:
        cur.execute(store._sql("SELECT COUNT(*) FROM (SELECT item_id FROM events WHERE kind = ? "
                               "AND item_id >= ? GROUP BY item_id HAVING COUNT(*) > 1) t"),
                    ("upsert", ITEM0))
        twice_upserts = int(cur.fetchone()[0])
    store.close()
    n_records = int(applied[1::2].sum())
    twice = twice_upserts + max(0, online - 2 * n_records) // 2
    acked = calls.acked
    return {"acknowledged": int(acked.sum()), "applied": int(applied.sum()),
            "lost": int((acked & ~applied).sum()), "applied_twice": twice,
            "retried_calls": int((calls.retried > 0).sum()), "failed_calls": len(calls.errors)}


def durability(bundles: Path, options: list[str], url: str, args) -> dict:
    """The kill -9 burst on one store."""
    port = free_port()
    proc, _, _ = start_server(bundles, *options, port=port)
    wait_serving(client(port), proc)
    calls = Calls(args.calls, f"burst-{os.getpid()}")
    joiner = burst(calls, port, args.threads, list(range(args.calls)))
    while calls.acked.sum() < args.kill_at * args.calls:
        time.sleep(0.005)
    acked_at_kill = int(calls.acked.sum())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    proc, _, _ = start_server(bundles, *options, port=port)
    wait_serving(client(port), proc)
    down = time.monotonic() - killed
    joiner.join()
    try:
        return verify(calls, port, url) | {"acked_before_kill": acked_at_kill,
                                           "restart_s": round(down, 2)}
    finally:
        stop(proc)


def throughput(port: int, args) -> dict:
    """ops/s of each write RPC from args.threads threads."""
    out = {}
    for name, offset in (("UpsertItem", 0), ("RecordInteractions", 1)):
        calls = Calls(2 * args.throughput_calls, f"tp-{os.getpid()}", offset=1_000_000)
        indices = [2 * k + offset for k in range(args.throughput_calls)]
        start = time.perf_counter()
        burst(calls, port, args.threads, indices).join()
        out[name] = round(args.throughput_calls / (time.perf_counter() - start), 1)
        if calls.errors:
            raise RuntimeError(f"{name} throughput calls failed: {calls.errors[:3]}")
    return out


def latency(port: int, seconds: float, writer: bool) -> dict:
    """Recommend p50/p99 (ms) from 2 threads, with or without a writer thread."""
    stop_at = time.monotonic() + seconds
    samples: list[float] = []
    writes = [0]

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with client(port, own_connection=True) as c:
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                c.recommend(int(rng.integers(0, 50)) * 10, 10)
                samples.append(time.perf_counter() - t)

    def write() -> None:
        calls = Calls(10**6, f"lat-{os.getpid()}", offset=2_000_000)
        with client(port, own_connection=True) as c:
            i = 0
            while time.monotonic() < stop_at:
                calls.send(c, i)
                i, writes[0] = i + 1, writes[0] + 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=write)] if writer else []
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests": len(ms),
            "writes_per_s": round(writes[0] / seconds, 1)}


def run_store(kind: str, root: Path, args, cluster: PgCluster | None) -> dict:
    """All three measurements on one store."""
    bundles = root / kind
    write_test_bundle(bundles, BundleSpec())
    url = cluster.new_store_url() if kind == "postgresql" else str(bundles / ".state")
    options = ["--poll-seconds", "0.5"] + (["--store", url] if kind == "postgresql" else [])
    result = {"durability": durability(bundles, options, url, args)}
    proc, port, _ = start_server(bundles, *options)
    try:
        wait_serving(client(port), proc)
        result["throughput_ops_s"] = throughput(port, args)
        result["recommend_alone"] = latency(port, args.latency_seconds, writer=False)
        result["recommend_with_writer"] = latency(port, args.latency_seconds, writer=True)
    finally:
        stop(proc)
    return result


def train_catalogue(root: Path) -> tuple[Path, dict[int, str]]:
    """Synthetic catalogue (800 users, 400 items) and a LightGCN bundle of it; returns
    (bundles, item -> category)."""
    from train.synthetic import generate

    data = generate(root / "data", n_users=800, n_items=400, seed=7)
    config = root / "lightgcn.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 7, "data": {"path": str(data)},
        "backbone": {"name": "lightgcn", "embedding_size": 64, "n_layers": 2},
        "optim": {"learning_rate": 1e-3, "batch_size": 1024, "epochs": 40},
        "eval": {"ks": [10, 20], "patience": 10}}))
    subprocess.run([sys.executable, "-m", "export.retrain", "--config", str(config), "--bundles",
                    str(root / "bundles"), "--runs-dir", str(root / "runs")], cwd=ROOT,
                   check=True, capture_output=True)
    lines = (data / "attributes.tsv").read_text().splitlines()[1:]
    return root / "bundles", {int(r.split("\t")[0]): r.split("\t")[1] for r in lines}


def foldin(root: Path, n_users: int) -> dict:
    """Share of a category in users' top-10 before and after 5 interactions with its items."""
    from index.bundle import load_current

    bundles, category = train_catalogue(root)
    live = load_current(bundles)
    items = live.load_npy("item_ids.npy").tolist()
    users = live.load_npy("user_ids.npy")
    cats = sorted(set(category.values()))
    by_cat = {c: [i for i in items if category[i] == c] for c in cats}
    rng = np.random.default_rng(0)
    proc, port, _ = start_server(bundles)
    shares = {"before": [], "after": [], "unknown_before": [], "unknown_after": []}
    try:
        with client(port) as c:
            wait_serving(c, proc)
            for k, user in enumerate(rng.choice(users, n_users, replace=False).tolist()):
                for known, uid in ((True, user), (False, 10**7 + k)):
                    cat = cats[int(rng.integers(len(cats)))]
                    key = "" if known else "unknown_"
                    top = [i.item_id for i in c.recommend(uid, 10).items]
                    shares[key + "before"].append(np.mean([category[i] == cat for i in top]))
                    pool = [i for i in by_cat[cat] if i not in top]
                    c.record(uid, rng.choice(pool, 5, replace=False).tolist(), kind="click")
                    top = [i.item_id for i in c.recommend(uid, 10).items]
                    shares[key + "after"].append(np.mean([category[i] == cat for i in top]))
    finally:
        stop(proc)
    return {"users": n_users} | {k: float(np.mean(v)) for k, v in shares.items()}


def payloads(root: Path) -> list[dict]:
    """ms per durable commit of an image: inline BLOB vs a content-addressed file + its row."""
    rows = []
    for size, n in ((4 << 10, 200), (100 << 10, 100), (1 << 20, 30), (8 << 20, 8)):
        db = sqlite3.connect(root / f"p{size}.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE e (id INTEGER PRIMARY KEY, image BLOB, sha TEXT)")
        blobs = [os.urandom(size) for _ in range(n)]
        timings = {}
        for mode in ("inline", "file"):
            start = time.perf_counter()
            for data in blobs:
                sha = hashlib.sha256(data).hexdigest() if mode == "file" else None
                if sha:
                    write_bytes(root / "blobs" / sha, data)
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO e (image, sha) VALUES (?, ?)", (None if sha else data, sha))
                db.execute("COMMIT")
            timings[mode] = round((time.perf_counter() - start) / n * 1000, 2)
        rows.append({"kib": size >> 10, "inline_ms": timings["inline"],
                     "file_ms": timings["file"]})
        db.close()
    return rows


def report(results: dict) -> None:
    """Print the tables."""
    print("\n== durability: SIGKILL mid-burst, restart on the same store ==")
    print(f"{'store':<11}{'acked':>7}{'applied':>9}{'lost':>6}{'twice':>7}{'acked@kill':>12}"
          f"{'retried':>9}{'failed':>8}{'restart s':>11}")
    for kind, r in results["stores"].items():
        d = r["durability"]
        print(f"{kind:<11}{d['acknowledged']:>7}{d['applied']:>9}{d['lost']:>6}"
              f"{d['applied_twice']:>7}{d['acked_before_kill']:>12}{d['retried_calls']:>9}"
              f"{d['failed_calls']:>8}{d['restart_s']:>11}")
    print("\n== write throughput (ops/s) and Recommend latency (2 reader threads) ==")
    for kind, r in results["stores"].items():
        a, w = r["recommend_alone"], r["recommend_with_writer"]
        print(f"{kind:<11} UpsertItem {r['throughput_ops_s']['UpsertItem']:>7} ops/s  "
              f"RecordInteractions {r['throughput_ops_s']['RecordInteractions']:>7} ops/s  "
              f"Recommend p50/p99 {a['p50_ms']}/{a['p99_ms']} ms alone, {w['p50_ms']}/"
              f"{w['p99_ms']} ms with a writer ({w['writes_per_s']} writes/s)")
    if "foldin" in results:
        f = results["foldin"]
        print(f"\n== fold-in on the synthetic catalogue ({f['users']} known users, 5 interactions"
              f" with one category each) ==\nshare of that category in the top-10: before "
              f"{f['before']:.3f}, after {f['after']:.3f} (unknown users: popularity "
              f"{f['unknown_before']:.3f}, after {f['unknown_after']:.3f})")
    if "payloads" in results:
        print("\n== SQLite commit of an image payload (ms): inline BLOB vs file + row ==")
        for row in results["payloads"]:
            print(f"{row['kib']:>6} KiB  inline {row['inline_ms']:>7}  file {row['file_ms']:>7}")


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts and print the tables."""
    args = parse_args(argv)
    results: dict = {"stores": {}}
    with tempfile.TemporaryDirectory(prefix="ptmrec-durability-", dir=ROOT / "runs"
                                     if (ROOT / "runs").is_dir() else None) as tmp:
        root = Path(tmp)
        cluster = PgCluster().init().start() if "postgresql" in args.stores else None
        try:
            for kind in args.stores:
                print(f"-- {kind} ...", flush=True)
                results["stores"][kind] = run_store(kind, root, args, cluster)
        finally:
            if cluster is not None:
                cluster.remove()
        if not args.skip_foldin:
            print("-- fold-in on the synthetic catalogue ...", flush=True)
            results["foldin"] = foldin(root / "foldin", args.fold_users)
        if not args.skip_payloads:
            (root / "payloads").mkdir()
            results["payloads"] = payloads(root / "payloads")
    report(results)
    bad = [k for k, r in results["stores"].items() if r["durability"]["lost"]
           or r["durability"]["applied_twice"] or r["durability"]["failed_calls"]]
    return 1 if bad else 0



if __name__ == "__main__":
    sys.exit(main())
