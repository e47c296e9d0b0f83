"""Benchmark index.ann factories for large catalogues: memory per item, build, recall@20, p50/p99.

One catalogue size per run (`--n`, d = `--dim`), the clustered synthetic vectors of
bench/index_bench.py generated blockwise in float32. Per factory ("{nlist}" is replaced by
`--nlist`, default the power of two nearest sqrt(N)): build seconds (train on index.ann's seeded
sample + add, `--build-threads`), bytes per item as the saved file size / N and as the process RSS
growth / N (the in-memory form adds IDMap2's reverse map), then per search setting recall@k against
exact inner-product search (brute force with faiss.knn, blockwise, build threads) on `--queries`
queries and p50/p99 of one `index.ann.search` call per query with one thread (the serving path).
`--shards S` also splits the catalogue into S contiguous parts, each its own index of the first
factory, searched together through faiss.IndexShards, serial and threaded (recall and latency
against the single index; the memory is the same, all shards live in this process).

    python -m bench.index_scale --n 1000000 --build-threads 2
    python -m bench.index_scale --n 10000000 --build-threads 2 --shards 2
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index import ann

FACTORIES = ["IVF{nlist},Flat", "IVF{nlist},SQ8", "IVF{nlist},PQ16",
             "IVF{nlist},PQ16,Refine(SQ8)", "OPQ16,IVF{nlist},PQ16"]
BLOCK = 262_144


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.35)
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: power of two near sqrt N)")
    p.add_argument("--factories", nargs="+", default=FACTORIES)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--k-factor", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--ef", type=int, nargs="+", default=[64, 128])
    p.add_argument("--flat-queries", type=int, default=20,
                   help="queries timed on the exact Flat index (it is slow)")
    p.add_argument("--shards", type=int, default=0, help="also time IndexShards of this many")
    p.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def clustered(n: int, args: argparse.Namespace, seed: int) -> np.ndarray:
    """(n, d) float32 L2-normalised points around fixed Gaussian centres, built blockwise."""
    centres = np.random.default_rng(args.seed).standard_normal((args.centres, args.dim))
    centres = centres.astype(np.float32)
    rng = np.random.default_rng(seed)
    x = np.empty((n, args.dim), dtype=np.float32)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        block = centres[rng.integers(0, args.centres, m)]  # (m, d)
        block += args.noise * rng.standard_normal((m, args.dim), dtype=np.float32)
        x[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, threads: int) -> np.ndarray:
    """(Q, k) row numbers of the exact inner-product top-k (faiss.knn blocks internally)."""
    faiss.omp_set_num_threads(threads)
    _, rows = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(1)
    return rows


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found."""
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1]
                          for a, b in zip(got, truth)]))


def timed(search, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query latency in µs (Q,) and ids (Q, k): one call per query after a short warm-up."""
    for i in range(min(5, len(q))):
        search(q[i:i + 1])
    lat, ids = np.empty(len(q)), []
    for i in range(len(q)):
        start = time.perf_counter_ns()
        got = search(q[i:i + 1])
        lat[i] = (time.perf_counter_ns() - start) / 1e3
        ids.append(got[0])
    return lat, np.stack(ids)


def settings(index: faiss.Index, args: argparse.Namespace) -> list[dict]:
    """Search settings to sweep for this index type."""
    params = ann.get_search_params(index)
    if "efSearch" in params:
        return [{"ef_search": ef} for ef in args.ef]
    out = [{"nprobe": p} for p in args.nprobe] if "nprobe" in params else [{}]
    if "k_factor" in params:
        out = [dict(o, k_factor=kf) for o in out for kf in args.k_factor]
    return out


def saved_size(index: faiss.Index) -> int:
    """Bytes of the index as `ann.save` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.faiss"
        ann.save(index, path)
        return path.stat().st_size


def measure(name: str, build, x: np.ndarray, q: np.ndarray, truth: np.ndarray,
            args: argparse.Namespace) -> tuple[list[dict], faiss.Index]:
    """Build one index, record its size, sweep its settings; returns rows and the index."""
    gc.collect()
    before = rss_bytes()
    faiss.omp_set_num_threads(args.build_threads)
    start = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    rss = rss_bytes() - before
    file_bytes = saved_size(index)
    rows = []
    few = name == "Flat"
    qs, ts = (q[:args.flat_queries], truth[:args.flat_queries]) if few else (q, truth)
    for setting in settings(index, args) if name != "Flat" else [{}]:
        if setting:
            ann.set_search_params(index, **setting)
        lat, got = timed(lambda v: ann.search(index, v, args.k)[1], qs)
        rows.append(row(args, name, setting, build_s, file_bytes, rss, lat, recall(got, ts)))
        build_s = None
        print(fmt(rows[-1]), file=sys.stderr, flush=True)
    return rows, index


def row(args: argparse.Namespace, name: str, setting: dict, build_s: float | None,
        file_bytes: int, rss: int, lat: np.ndarray, rec: float) -> dict:
    """One result line."""
    p50, p99 = np.percentile(lat, [50, 99])
    label = ", ".join(f"{k} {v}" for k, v in setting.items()) or "exact"
    return dict(n=args.n, name=name, setting=label, build=build_s, file=file_bytes / args.n,
                rss=rss / args.n, p50=p50, p99=p99, recall=rec)


def fmt(r: dict) -> str:
    """Markdown table line."""
    build = "" if r["build"] is None else f"{r['build']:.0f}"
    gib = r["rss"] * r["n"] / 2**30
    return (f"| {r['n']:,} | {r['name']} | {r['setting']} | {r['file']:.0f} | {r['rss']:.0f} | "
            f"{gib:.2f} | {build} | {r['recall']:.3f} | {r['p50']:.0f} | {r['p99']:.0f} |")


def sharded(first: str, x: np.ndarray, ids: np.ndarray, q: np.ndarray, truth: np.ndarray,
            args: argparse.Namespace) -> list[dict]:
    """`--shards` indexes of `first` over contiguous slices, searched through IndexShards."""
    bounds = np.linspace(0, len(x), args.shards + 1).astype(int)
    faiss.omp_set_num_threads(args.build_threads)
    start = time.perf_counter()
    shards = [ann.build(x[a:b], ids[a:b], first, use_gpu=False)
              for a, b in zip(bounds[:-1], bounds[1:])]
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    file_bytes = sum(saved_size(s) for s in shards)
    rows = []
    for threaded in (False, True):
        union = faiss.IndexShards(args.dim, threaded, False)
        for s in shards:
            union.add_shard(s)
        for setting in settings(shards[0], args):
            for s in shards:
                ann.set_search_params(s, **setting)
            lat, got = timed(lambda v: union.search(v, args.k)[1], q)
            name = f"{args.shards} x {first} ({'threaded' if threaded else 'serial'} IndexShards)"
            rows.append(row(args, name, setting, build_s, file_bytes, 0, lat, recall(got, truth)))
            build_s = None
            print(fmt(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Generate, compute the exact truth, measure every factory, print the table."""
    args = parse_args(argv)
    nlist = args.nlist or 2 ** round(math.log2(math.sqrt(args.n)))
    start = time.perf_counter()
    x = clustered(args.n, args, seed=args.seed + 1)
    q = clustered(args.queries, args, seed=args.seed + 2)
    ids = np.arange(args.n, dtype=np.int64)
    truth = exact_topk(x, q, args.k, args.build_threads)  # row == id here
    print(f"data + exact truth: {time.perf_counter() - start:.0f} s, RSS "
          f"{rss_bytes() / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    rows = []
    for template in ["Flat"] + args.factories:
        factory = template.format(nlist=nlist)
        got, index = measure(factory, lambda: ann.build(x, ids, factory, use_gpu=False),
                             x, q, truth, args)
        rows += got
        del index
    if args.shards:
        rows += sharded(args.factories[0].format(nlist=nlist), x, ids, q, truth, args)
    print(f"\nN={args.n:,}, d={args.dim}, k={args.k}, {args.queries} queries, 1 search thread, "
          f"{args.build_threads} build threads, faiss {faiss.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| N | index | setting | file B/item | RSS B/item | RSS GiB | build s | "
          f"recall@{args.k} | p50 µs | p99 µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(fmt(r))


if __name__ == "__main__":
    main()
