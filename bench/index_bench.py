"""Benchmark index.ann: build time, single-query latency and recall@k for Flat, HNSW and IVF.

Data are clustered synthetic embeddings (Gaussian centres plus noise, L2-normalised, queries
drawn around the same centres), the regime of SERVING.md §2.4. Latency is one `index.ann.search`
call per query (a batch of one, the serving path) with `--threads` OpenMP threads; builds and the
exact ground truth use `--build-threads`. Recall@k is measured against exact inner-product search.
Also times the sha256 verification of a bundle holding users.npy and the Flat items.faiss.

With `--groups G` the vectors have PerPEFT's layout (train/perpeft.py): an item is G blocks of
`--dim`, block g its clustered vector plus `--group-noise` of its own noise (renormalised: the
groups' views of the item differ that much), and a query is one clustered vector in a random
block, zero elsewhere (a user scores only against its group's block).

    python -m bench.index_bench --sizes 100000 1000000 --dim 64 --queries 500
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np


from index import ann, bundle
from index.manifest import Counts, Manifest

TARGET_P99_US = 1000.0
TARGET_RECALL = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.35)
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads for searches")
    p.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--flat-latency-queries", type=int, default=100,
                   help="exact search is slow; time it on this many queries only")
    p.add_argument("--exclude", type=int, default=100,
                   help="random ids excluded (plus each query's true top-10) in the filtered row")
    p.add_argument("--no-bundle", action="store_true", help="skip the bundle verification timing")
    p.add_argument("--groups", type=int, default=1, help="PerPEFT user groups (G-block vectors)")
    p.add_argument("--group-noise", type=float, default=0.5,
                   help="with --groups: how far each group's block moves from the shared one")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def clustered(n: int, args: argparse.Namespace, seed: int) -> np.ndarray:
    """L2-normalised points around fixed Gaussian centres."""
    centres = np.random.default_rng(args.seed).standard_normal((args.centres, args.dim))
    rng = np.random.default_rng(seed)
    x = np.empty((n, args.dim), dtype=np.float32)
    for start in range(0, n, 262_144):
        m = min(262_144, n - start)
        block = centres[rng.integers(0, args.centres, m)] + args.noise * rng.standard_normal(
            (m, args.dim))
        x[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def grouped_items(x: np.ndarray, args: argparse.Namespace, seed: int) -> np.ndarray:
    """(n, G·d): per group, each vector plus group noise, renormalised (x itself when G = 1)."""
    if args.groups == 1:
        return x
    rng = np.random.default_rng(seed)
    out = np.empty((len(x), x.shape[1] * args.groups), dtype=np.float32)
    d = x.shape[1]
    for g in range(args.groups):
        for start in range(0, len(x), 262_144):
            part = x[start:start + 262_144]
            block = part + args.group_noise * rng.standard_normal(part.shape) / math.sqrt(d)
            out[start:start + len(part), g * d:(g + 1) * d] = (
                block / np.linalg.norm(block, axis=1, keepdims=True))
    return out


def block_queries(q: np.ndarray, args: argparse.Namespace, seed: int) -> np.ndarray:
    """(Q, G·d): each query in one random group's block, zeros elsewhere (q itself when G = 1)."""
    if args.groups == 1:
        return q
    groups = np.random.default_rng(seed).integers(0, args.groups, len(q))
    d = q.shape[1]
    out = np.zeros((len(q), d * args.groups), dtype=np.float32)
    for i, g in enumerate(groups):
        out[i, g * d:(g + 1) * d] = q[i]
    return out


def timed_searches(index: faiss.Index, q: np.ndarray, k: int,
                   exclude: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query latency in µs (Q,) and ids (Q, k), one search call per query."""
    for i in range(min(5, len(q))):
        ann.search(index, q[i:i + 1], k)
    lat = np.empty(len(q))
    ids = np.empty((len(q), k), dtype=np.int64)
    for i in range(len(q)):
        ex = None if exclude is None else [exclude[i]]
        start = time.perf_counter_ns()
        _, got = ann.search(index, q[i:i + 1], k, exclude=ex)
        lat[i] = (time.perf_counter_ns() - start) / 1e3
        ids[i] = got[0]
    return lat, ids


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, truth)]))


def row(n: int, name: str, params: str, build_s: float | None, lat: np.ndarray,
        rec: float) -> dict:
    """One result line."""
    p50, p99 = np.percentile(lat, [50, 99])
    return dict(n=n, name=name, params=params, build=build_s, p50=p50, p99=p99, recall=rec,
                ok=p99 <= TARGET_P99_US and rec >= TARGET_RECALL)


def build_timed(x: np.ndarray, ids: np.ndarray, factory: str,
                args: argparse.Namespace) -> tuple[faiss.Index, float]:
    """Build with the build thread count; returns the index and seconds taken."""
    faiss.omp_set_num_threads(args.build_threads)
    start = time.perf_counter()
    index = ann.build(x, ids, factory, use_gpu=False)
    seconds = time.perf_counter() - start
    faiss.omp_set_num_threads(args.threads)
    return index, seconds


def bench_size(n: int, args: argparse.Namespace) -> list[dict]:
    """All index variants at one catalogue size."""
    x = grouped_items(clustered(n, args, seed=args.seed + 1), args, seed=args.seed + 5)
    ids = np.arange(n, dtype=np.int64)
    q = block_queries(clustered(args.queries, args, seed=args.seed + 2), args, args.seed + 6)
    k = args.k
    flat, flat_s = build_timed(x, ids, "Flat", args)
    faiss.omp_set_num_threads(args.build_threads)
    _, truth_wide = ann.search(flat, q, k + 30)  # exact, batched
    truth = truth_wide[:, :k]
    faiss.omp_set_num_threads(args.threads)
    few = slice(0, min(args.flat_latency_queries, len(q)))
    lat, got = timed_searches(flat, q[few], k)
    rows = [row(n, "Flat", "exact", flat_s, lat, recall(got, truth[few]))]
    del flat

    hnsw, hnsw_s = build_timed(x, ids, f"HNSW{args.hnsw_m}", args)
    for i, ef in enumerate(args.ef):
        ann.set_search_params(hnsw, ef_search=ef)
        lat, got = timed_searches(hnsw, q, k)
        rows.append(row(n, f"HNSW{args.hnsw_m}", f"efSearch={ef}", hnsw_s if i == 0 else None,
                        lat, recall(got, truth)))
    rows.append(filtered_row(n, hnsw, q, truth_wide, args))
    del hnsw

    nlist = int(round(4 * math.sqrt(n)))
    ivf, ivf_s = build_timed(x, ids, f"IVF{nlist},Flat", args)
    for i, nprobe in enumerate(args.nprobe):
        ann.set_search_params(ivf, nprobe=nprobe)
        lat, got = timed_searches(ivf, q, k)
        rows.append(row(n, f"IVF{nlist},Flat", f"nprobe={nprobe}", ivf_s if i == 0 else None,
                        lat, recall(got, truth)))
    return rows


def filtered_row(n: int, hnsw: faiss.Index, q: np.ndarray, truth_wide: np.ndarray,
                 args: argparse.Namespace) -> dict:
    """HNSW with per-query exclusions (true top-10 plus random ids) at the largest efSearch."""
    rng = np.random.default_rng(args.seed + 3)
    exclude = [np.concatenate([truth_wide[i, :10], rng.integers(0, n, args.exclude)])
               for i in range(len(q))]
    truth = np.stack([t[~np.isin(t, ex)][:args.k] for t, ex in zip(truth_wide, exclude)])
    ef = max(args.ef)
    ann.set_search_params(hnsw, ef_search=ef)
    lat, got = timed_searches(hnsw, q, args.k, exclude)
    leaked = sum(int(np.isin(g, ex).sum()) for g, ex in zip(got, exclude))
    assert leaked == 0, f"{leaked} excluded ids returned"
    return row(n, f"HNSW{args.hnsw_m}", f"efSearch={ef}, {args.exclude}+10 excluded", None,
               lat, recall(got, truth))


def bench_bundle(n: int, args: argparse.Namespace) -> str:
    """Seconds to write and to verify a bundle of users.npy + a Flat items.faiss at size n."""
    x = grouped_items(clustered(n, args, seed=args.seed + 4), args, seed=args.seed + 7)
    root = Path(tempfile.mkdtemp(prefix="index-bench-"))
    try:
        def write(target: Path) -> None:
            np.save(target / bundle.USERS, x)
            ann.save(ann.build(x, np.arange(n), "Flat", use_gpu=False), target / bundle.ITEMS_INDEX)

        manifest = Manifest(source_run="bench", config_hash="-", backbone="-", dim=x.shape[1],
                            normalized=True, faiss_factory="Flat", counts=Counts(users=n, items=n))
        start = time.perf_counter()
        path = bundle.write_bundle(root, write, manifest)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        bundle.load_bundle(path)
        verify_s = time.perf_counter() - start
        size_mb = sum(f.bytes for f in bundle.load_bundle(path).manifest.files.values()) / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return (f"bundle {n:,} users + {n:,} items x {x.shape[1]} ({size_mb:.0f} MiB): "
            f"write {write_s:.2f} s, load_bundle (sha256 verify) {verify_s:.2f} s")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """Markdown table of all results."""
    print(f"\nk={args.k}, d={args.dim} x {args.groups} group(s), {args.queries} queries, search threads={args.threads}, "
          f"build threads={args.build_threads}, faiss {faiss.__version__}\n")
    print("| N | index | search params | build s | p50 µs | p99 µs | recall@20 | target |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        build = "" if r["build"] is None else f"{r['build']:.1f}"
        print(f"| {r['n']:,} | {r['name']} | {r['params']} | {build} | {r['p50']:.0f} | "
              f"{r['p99']:.0f} | {r['recall']:.3f} | {'yes' if r['ok'] else ''} |")


def main(argv: list[str] | None = None) -> None:
    """Run every size, print the table, name the cheapest setting that meets the target."""
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    rows, notes = [], []
    for n in args.sizes:
        start = time.perf_counter()
        rows += bench_size(n, args)
        print(f"N={n:,} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if not args.no_bundle:
            notes.append(bench_bundle(n, args))
    print_table(rows, args)
    for n in args.sizes:
        ok = [r for r in rows if r["n"] == n and r["ok"] and r["name"] != "Flat"
              and "excluded" not in r["params"]]
        best = min(ok, key=lambda r: r["p99"], default=None)
        print(f"\nN={n:,}: " + ("no setting meets p99 <= 1 ms with recall >= 0.95" if best is None
                               else f"fastest setting meeting the target: {best['name']} "
                                    f"{best['params']} (p99 {best['p99']:.0f} µs, "
                                    f"recall {best['recall']:.3f})"))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
